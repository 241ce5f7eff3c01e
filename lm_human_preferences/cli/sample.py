"""`sample.py sample --save_dir D ...`: print samples of a trained policy, as the original."""

import torch

from lm_human_preferences.cli import options
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.task.policy import load_policy
from lm_human_preferences.training import run, train_dpo, train_policy
from lm_human_preferences.utils import distributed, save_folders, storage
from lm_human_preferences.utils.errors import UserError

SAMPLE_HELP = """\
usage: sample.py sample --save_dir D [--savescope policy] [--mpi N] [--temperature T] [--seed S]
                        [--batch_size B] [--nsamples N]

Sample from a policy trained by train_policy (or train_dpo). D is its save folder (a path,
https:// or gs:// URL) holding train_policy_hparams.json (train_dpo_hparams.json) and SAVESCOPE/. Queries come from the task's
test split. Each sample prints a line of 80 '=', the query, then the untruncated response
(newlines as ⏎), as the original did.

options:
  --savescope S    subfolder (and checkpoint scope) of the policy (default: policy)
  --mpi N          data-parallel ranks (default: one per visible GPU, else 1)
  --temperature T  sampling temperature (default: 1.0, as the original)
  --seed S         random seed (default: random)
  --batch_size B   queries per batch on each rank (default: 4)
  --nsamples N     samples to print in all; 0 samples forever (default: 0)
"""


def _sample_rank(save_dir: str, savescope: str, temperature: float, seed: int | None, batch_size: int,
                 nsamples: int) -> None:
    dpo_path = storage.join(save_dir, save_folders.DPO_HPARAMS)
    if not storage.is_remote(save_dir) and storage.exists(dpo_path):
        hp = train_dpo.HParams.from_json(storage.fetch(dpo_path).read_text())
    else:
        hp = train_policy.HParams.from_json(storage.fetch(storage.join(save_dir, save_folders.POLICY_HPARAMS)).read_text())
    hp.task.policy.temperature = temperature
    device = distributed.device()
    policy = load_policy(storage.join(save_dir, savescope), hp.task, device)
    encoding = policy.encoding
    seed = distributed.broadcast_object(seed if seed is not None else int(torch.randint(2 ** 31, ()).item()))
    rank, world = distributed.rank(), distributed.world_size()
    generator = run.rank_generator(seed, device)
    queries = lm_tasks.query_batches(hp.task, encoding, batch_size, mode="test", rank=rank, world=world,
                                     device=device)
    printed = 0
    while True:
        batch = next(queries)
        responses = policy.respond(batch, hp.task.response_length, generator, hp.run.chunk_size)["responses"]
        batch, responses = distributed.all_gather_cat(batch), distributed.all_gather_cat(responses)
        for query, response in zip(batch.tolist(), responses.tolist()):
            if nsamples and printed >= nsamples:
                return
            if distributed.is_main():
                print("=" * 80)
                print(encoding.decode(query).replace("\n", "⏎"))
                print(encoding.decode(response).replace("\n", "⏎"), flush=True)
            printed += 1


def sample(args: list[str]) -> None:
    if not args or "--help" in args or "-h" in args:
        print(SAMPLE_HELP)
        return
    if args[0] != "sample":
        raise UserError(f"unknown command {args[0]!r}; usage: sample.py sample --save_dir D (see --help)")
    flags = options.parse(args[1:], booleans=set())
    if "save_dir" not in flags:
        raise UserError("sample needs --save_dir (a train_policy save folder or URL)")
    save_dir = flags.pop("save_dir")
    savescope = flags.pop("savescope", save_folders.POLICY)
    ranks = options.pop_int(flags, "mpi", distributed.default_ranks(), minimum=1, meaning=" (the number of ranks)")
    seed = options.pop_int(flags, "seed", None)
    batch_size = options.pop_int(flags, "batch_size", 4, minimum=1)
    nsamples = options.pop_int(flags, "nsamples", 0, minimum=0, meaning=" (0 samples forever)")
    temperature = options.pop_float(flags, "temperature", 1.0, positive=True)
    if flags:
        raise UserError(f"unknown option --{next(iter(flags))} (see --help)")
    distributed.run(_sample_rank, (save_dir, savescope, temperature, seed, batch_size, nsamples), ranks)
