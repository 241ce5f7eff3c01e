import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_human_preferences.task import rewards
from lm_human_preferences.language import tf_checkpoint, trained_models
from lm_human_preferences.utils.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "tf"
ROOT = Path(__file__).resolve().parent.parent
RUN_URL = "gs://lm-human-preferences/runs/descriptiveness"


def serve(server, local: Path, url_path: str) -> None:
    for file in local.rglob("*"):
        if file.is_file() and file.name != "reference.npz":
            server.add_file(f"{url_path}/{file.relative_to(local)}", file.read_bytes())


@pytest.fixture()
def gpt2_served(http_server):
    serve(http_server, FIXTURES / "gpt2", "gpt-2/models/124M")
    return np.load(FIXTURES / "gpt2" / "reference.npz")


@pytest.fixture()
def run_served(http_server):
    serve(http_server, FIXTURES / "run", "lm-human-preferences/runs/descriptiveness")
    return np.load(FIXTURES / "run" / "reference.npz")


def test_crc32c():
    assert tf_checkpoint.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = os.urandom(3 * 4096 + 123)
    crc = 0xFFFFFFFF
    for byte in data:  # bit-by-bit reference
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    assert tf_checkpoint.crc32c(data) == crc ^ 0xFFFFFFFF
    assert tf_checkpoint.unmask_crc(tf_checkpoint.mask_crc(12345)) == 12345


def test_snappy_literals_and_overlapping_copies():
    # 'abcd' literal, then a 1-byte-offset copy of length 8 at offset 4 (overlapping), then 'x'
    block = bytes([13]) + bytes([3 << 2]) + b"abcd" + bytes([((8 - 4) << 2) | 1, 4]) + bytes([0 << 2]) + b"x"
    assert tf_checkpoint.snappy_decompress(block) == b"abcdabcdabcdx"
    with pytest.raises(tf_checkpoint.CheckpointError, match="bad back-reference"):
        tf_checkpoint.snappy_decompress(bytes([4, ((4 - 4) << 2) | 1, 9]))


def test_raw_and_snappy_indexes_read_the_same(tmp_path):
    shutil.copytree(FIXTURES / "gpt2", tmp_path / "gpt2")
    raw_shards, raw = tf_checkpoint.read_index(tmp_path / "gpt2" / "model.ckpt.index")
    snappy_shards, snappy = tf_checkpoint.read_index(tmp_path / "gpt2" / "model.ckpt.index.snappy")
    assert raw == snappy and raw_shards == snappy_shards == 1
    assert raw["model/h1/attn/c_attn/w"].shape == (1, 8, 24) and raw["model/wte"].shape == (50257, 8)
    tensors = tf_checkpoint.read_tensors(raw, 1, lambda i, n: tmp_path / "gpt2" / f"model.ckpt.data-{i:05d}-of-{n:05d}")
    assert tensors["model/ln_f/g"].dtype == np.float32 and tensors["model/wpe"].shape == (16, 8)


def test_gpt2_release_layout_matches_tensorflow(gpt2_served):
    model, encoding = trained_models.load_initial("124M")
    assert encoding == "main" and model.hparams.n_vocab == 50257
    with torch.no_grad():
        logits = model(torch.from_numpy(gpt2_served["tokens"]).long()).logits.double().numpy()
    ids = gpt2_served["vocab_ids"]
    delta = np.abs(logits[..., ids] - gpt2_served["logits"]).max()
    logsumexp = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    print(f"GPT-2 release layout: max |Δlogit| = {delta:.2e}")
    assert delta < 1e-4
    np.testing.assert_allclose(logsumexp, gpt2_served["logsumexp"], atol=1e-4)


def test_run_layout_policy_and_reward_model_match_tensorflow(run_served):
    policy, encoding = trained_models.load_initial(f"{RUN_URL}/policy", heads=("value",))
    assert encoding == "test"
    tokens = torch.from_numpy(run_served["tokens"]).long()
    with torch.no_grad():
        out = policy(tokens)
    logit_delta = (out.logits.double() - torch.from_numpy(run_served["policy_logits"])).abs().max().item()
    value_delta = (out.heads["value"].double() - torch.from_numpy(run_served["value"])).abs().max().item()
    reward_model = rewards.load_trained(f"{RUN_URL}/reward_model")
    with torch.no_grad():
        reward = reward_model(tokens[:, :4], tokens[:, 4:]).double()
    reward_delta = (reward - torch.from_numpy(run_served["reward"])).abs().max().item()
    print(f"run layout: max |Δlogit| = {logit_delta:.2e}, |Δvalue| = {value_delta:.2e}, |Δreward| = {reward_delta:.2e}")
    assert max(logit_delta, value_delta, reward_delta) < 1e-4
    assert reward_model.gain.item() == pytest.approx(1.7) and reward_model.bias.item() == pytest.approx(-0.3)
    saved = trained_models.load(f"{RUN_URL}/policy")
    assert saved.step == 7 and not any("adam" in k for k in saved.tensors)  # Adam slots and ref_policy skipped


def test_readme_commands_with_the_released_run_layout(run_served, tmp_path):
    env = {**os.environ}
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), "sample", "--save_dir", RUN_URL, "--savescope",
                          "policy", "--mpi", "1", "--nsamples", "3", "--seed", "1"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("=" * 80) == 3
    policy = subprocess.run([sys.executable, str(ROOT / "launch.py"), "train_policy", "test", "released",
                             "--rewards.trained_model", f"{RUN_URL}/reward_model", "--rewards.train_new_model", "off",
                             "--save_dir", str(tmp_path), "--ppo.total_episodes", "32"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert policy.returncode == 0, policy.stderr
    assert (tmp_path / "released" / "policy" / "checkpoints" / "latest").exists()


@pytest.mark.parametrize("damage, message", [
    ("flip_data", "fails its CRC-32C check"),
    ("truncate_data", "the data shard is truncated"),
    ("truncate_index", "truncated|not a TensorFlow checkpoint index"),
    ("flip_index", "fails its CRC-32C check|not a TensorFlow checkpoint index"),
    ("garbage_index", "not a TensorFlow checkpoint index"),
])
def test_damaged_checkpoints_give_clear_errors(tmp_path, damage, message):
    folder = tmp_path / "gpt2"
    shutil.copytree(FIXTURES / "gpt2", folder)
    data, index = folder / "model.ckpt.data-00000-of-00001", folder / "model.ckpt.index"
    blob = bytearray((data if "data" in damage else index).read_bytes())
    if damage == "flip_data":
        blob[1000] ^= 0xFF
    elif damage.startswith("truncate"):
        blob = blob[:len(blob) // 2]
    elif damage == "flip_index":
        blob[40] ^= 0xFF
    else:
        blob = bytearray(b"not a checkpoint" * 10)
    (data if "data" in damage else index).write_bytes(bytes(blob))
    with pytest.raises(UserError, match=message):
        trained_models.load(str(folder))


def test_missing_model_folder(http_server):
    with pytest.raises(UserError, match="no model here"):
        trained_models.load("gs://lm-human-preferences/runs/nothing/policy")
