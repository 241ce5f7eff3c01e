#!/usr/bin/env bash
# One prepared GPU session, for the day a GPU is lent (under 8 minutes on one H100, nothing fetched):
#
#   python bench/gpu_fixtures.py bench/gpu_fixtures     # here, where the test extras are installed
#   bash bench/gpu_session.sh                           # there, from the working tree (the device tool's run,
#                                                       # carrying bench/gpu_fixtures); OUT=... for the results
#
# The GPU machines hold torch, tiktoken, safetensors, tensorboard, matplotlib and transformers, but not
# ftfy and no network: bench/gpu_fixtures holds ftfy's wheel (and its dependency's) and GPT-2's encoding
# files in the URL layout (served as LMHP_MIRROR). Every figure goes to $OUT/gpu_session.txt, each
# step's records beside it; a step that fails is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
FIXTURES=${FIXTURES:-bench/gpu_fixtures}
mkdir -p "$OUT"
log="$OUT/gpu_session.txt"
export LMHP_MIRROR="$PWD/$FIXTURES/mirror" LMHP_CACHE_DIR="$OUT/cache" LMHP_RETRIES=0

step() {  # step SECONDS COMMAND...: run with a time limit, its output into the log
  local limit=$1; shift
  echo "== $* (limit ${limit} s)" | tee -a "$log"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tail -n 60 | tee -a "$log"
  echo "== exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; git rev-parse HEAD
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; date -u; } | tee "$log"
step 120 python3 -m pip install --no-index --no-deps "$FIXTURES"/wheels/*.whl
step 120 python3 -m pip install --no-deps --no-build-isolation -e .
# the CUDA checks and PPO throughput at the paper's shapes: batch 64 a GPU, 64 + 24 tokens, 124M
step 150 python3 bench/gpu_check.py --model 124M --batch_size 64 --updates 3 --model_dir "$OUT/models"
# the real command line: the test experiment, then a random-weight 124M (GPT-2's encoding from the mirror)
step 60 ./launch.py train_policy test gpu-test --save_dir "$OUT/runs" --ppo.total_episodes 64
step 90 ./launch.py train_policy test gpu-124m --save_dir "$OUT/runs" --task.policy.initial_model "$OUT/models/random-124M" \
  --task.query_length 64 --task.response_length 24 --rewards.train_new_model.labels.num_train 64 \
  --rewards.train_new_model.batch_size 32 --rewards.train_new_model.rollout_batch_size 64 \
  --rewards.train_new_model.normalize_samples 64 --ppo.batch_size 64 --ppo.total_episodes 128
# peak memory of 774M at batch 64, with and without gradient checkpointing
step 60 python3 bench/ppo_memory.py --model 774M --batch_size 64 --chunk_sizes 64 --out "$OUT/ppo_memory_774M.json"
step 90 python3 bench/ppo_memory.py --model 774M --batch_size 64 --chunk_sizes 64 --gradient_checkpointing \
  --out "$OUT/ppo_memory_774M_checkpointing.json"
# the decode step compiled (and with CUDA graphs) against eager
step 120 python3 bench/decode_compile.py --model 124M --batch_size 64 --out "$OUT/decode_compile.json"
echo "gpu_session: done; results in $log" | tee -a "$log"
