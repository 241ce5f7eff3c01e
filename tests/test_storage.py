import errno
import fcntl
import os
import re
import subprocess
import sys

import pytest

from lm_human_preferences.utils import cache, storage
from lm_human_preferences.utils.errors import UserError

BASE = storage.PUBLIC_BASE


def test_gs_paths_map_to_public_https():
    assert storage.canonical_url("gs://gpt-2/models/124M/hparams.json") == f"{BASE}/gpt-2/models/124M/hparams.json"
    assert (storage.canonical_url("gs://lm-human-preferences/labels/sentiment/offline_5k.json")
            == f"{BASE}/lm-human-preferences/labels/sentiment/offline_5k.json")
    assert storage.canonical_url(f"{BASE}/gpt-2/x") == f"{BASE}/gpt-2/x"
    with pytest.raises(UserError, match="only gs://gpt-2/ and gs://lm-human-preferences/ are known"):
        storage.canonical_url("gs://other-bucket/file")


def test_join():
    assert storage.join("gs://gpt-2/models/124M/", "hparams.json") == "gs://gpt-2/models/124M/hparams.json"
    assert storage.join("/tmp/x", "a", "b") == "/tmp/x/a/b"


def test_local_paths(tmp_path):
    f = tmp_path / "labels.json"
    f.write_text("[]")
    assert storage.fetch(str(f)) == f
    assert storage.exists(str(f))
    with pytest.raises(UserError, match="no such file"):
        storage.fetch(str(tmp_path / "missing.json"))
    assert not storage.exists(str(tmp_path / "missing.json"))


def test_download_is_cached_and_reused(http_server, tmp_path):
    http_server.add_file("lm-human-preferences/a/data.bin", b"x" * 5000)
    path = storage.fetch("gs://lm-human-preferences/a/data.bin")
    assert path.read_bytes() == b"x" * 5000
    assert str(path).startswith(str(tmp_path / "cache"))
    again = storage.fetch(f"{BASE}/lm-human-preferences/a/data.bin")
    assert again == path
    assert http_server.count("lm-human-preferences/a/data.bin") == 1


def test_retries_server_errors_then_succeeds(http_server):
    http_server.add_file("gpt-2/flaky.txt", b"finally")
    http_server.script("gpt-2/flaky.txt", "500", "500")
    assert storage.fetch("gs://gpt-2/flaky.txt", backoff=0.01).read_bytes() == b"finally"
    assert http_server.count("gpt-2/flaky.txt") == 3


def test_404_is_not_retried_and_names_the_url(http_server, tmp_path):
    expected = (f"{http_server.url}/gpt-2/nothing-here.json: not found (HTTP 404); "
                f"mirror (LMHP_MIRROR) of {BASE}/gpt-2/nothing-here.json; cache file ")
    with pytest.raises(UserError, match=re.escape(expected)):
        storage.fetch("gs://gpt-2/nothing-here.json", backoff=0.01)
    assert http_server.count("gpt-2/nothing-here.json") == 1
    assert not storage.exists("gs://gpt-2/nothing-here.json")


def _cache_files(tmp_path):
    records = (cache.SHA256SUMS, cache.NOT_FOUND)  # the cache's own lists, at its root
    return sorted(p.name for p in (tmp_path / "cache").rglob("*")
                  if p.is_file() and not p.name.endswith(".lock") and p.name not in records)


def test_dropped_connection_never_leaves_a_partial_file(http_server, tmp_path):
    http_server.add_file("gpt-2/big.bin", os.urandom(200_000))
    http_server.script("gpt-2/big.bin", "drop", "drop", "drop")
    with pytest.raises(UserError, match="download failed after 3 attempts .*connection"):
        storage.fetch("gs://gpt-2/big.bin", retries=2, backoff=0.01)
    assert _cache_files(tmp_path) == []
    # one more drop, then a good answer: the result is the whole file
    http_server.script("gpt-2/big.bin", "drop")
    path = storage.fetch("gs://gpt-2/big.bin", backoff=0.01)
    assert path.read_bytes() == (http_server.root / "gpt-2/big.bin").read_bytes()
    assert len(_cache_files(tmp_path)) == 1


def test_unreachable_host_is_a_clear_error():
    url = "http://127.0.0.1:9/file.json"
    with pytest.raises(storage.Offline) as caught:
        storage.fetch(url, retries=1, backoff=0.01)
    assert str(caught.value).startswith(f"{url}: cannot connect after 2 attempts (")
    assert str(caught.value).endswith(f"; cache file {cache.cache_path(url)}; to work without the network, run "
                                      f"`./launch.py fetch {url}` where there is one and copy its cache folder to "
                                      f"{cache.cache_dir()} (LMHP_CACHE_DIR), or give a local copy in its place")


def test_processes_share_one_download(http_server, tmp_path):
    http_server.add_file("gpt-2/shared.bin", b"y" * 1000)
    http_server.script("gpt-2/shared.bin", "slow")
    code = ("import sys; from lm_human_preferences.utils import storage; "
            "print(storage.fetch('gs://gpt-2/shared.bin').read_bytes() == b'y' * 1000)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outputs == ["True"] * 3
    assert http_server.count("gpt-2/shared.bin") == 1


def test_waiting_for_a_held_lock_times_out_clearly(http_server, monkeypatch):
    http_server.add_file("gpt-2/locked.bin", b"z")
    url = storage.canonical_url("gs://gpt-2/locked.bin")
    target = cache.cache_path(url)
    target.parent.mkdir(parents=True)
    cache.lock_path(target).parent.mkdir(parents=True)
    fd = os.open(cache.lock_path(target), os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    monkeypatch.setenv("LMHP_LOCK_TIMEOUT", "0.5")
    try:
        with pytest.raises(UserError, match="waited 0 s for another process downloading it"):
            storage.fetch("gs://gpt-2/locked.bin")
    finally:
        os.close(fd)
    assert storage.fetch("gs://gpt-2/locked.bin").read_bytes() == b"z"


def test_full_disk_is_a_clear_error_and_leaves_nothing(http_server, tmp_path, monkeypatch):
    http_server.add_file("gpt-2/full.bin", b"w" * 100)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    target = cache.cache_path(storage.canonical_url("gs://gpt-2/full.bin"))
    expected = (f"{http_server.url}/gpt-2/full.bin: disk full while saving the download; "
                f"mirror (LMHP_MIRROR) of {BASE}/gpt-2/full.bin; cache file {target}; free space or set LMHP_CACHE_DIR")
    with pytest.raises(UserError, match=re.escape(expected)):
        storage.fetch("gs://gpt-2/full.bin")
    assert _cache_files(tmp_path) == []
    with pytest.raises(UserError, match="disk full while writing"):
        storage.atomic_write_text(tmp_path / "out" / "x.json", "{}")
    assert not (tmp_path / "out" / "x.json").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_a_file_written_in_parts_goes_to_disk_as_it_is_written(tmp_path, monkeypatch):
    """Every SYNC_BYTES the data so far is synced (fdatasync), then the whole file: fsync when
    durable, else fdatasync; parts that fail half way leave the old file and nothing else."""
    calls = []

    def recorded(name: str):
        real = getattr(os, name)

        def sync(fd: int) -> None:
            calls.append((name, os.fstat(fd).st_size))  # (which sync, the bytes written so far)
            real(fd)
        return sync

    for name in ("fsync", "fdatasync"):
        monkeypatch.setattr(os, name, recorded(name))
    target = tmp_path / "labels.json"
    block = b"x" * (storage.SYNC_BYTES // 2)
    storage.atomic_write_parts(target, [block] * 5)
    half = len(block)
    assert calls == [("fdatasync", 2 * half), ("fdatasync", 4 * half), ("fsync", 5 * half)]
    calls.clear()
    storage.atomic_write_parts(target, [b"[", b"1", b"]"], durable=False)
    assert target.read_bytes() == b"[1]" and calls == [("fdatasync", 3)]

    def failing():
        yield b"[2"
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(UserError, match=f"cannot write {re.escape(str(target))} \\(Input/output error\\)"):
        storage.atomic_write_parts(target, failing())
    assert target.read_bytes() == b"[1]" and [p.name for p in tmp_path.iterdir()] == ["labels.json"]


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "f.json"
    storage.atomic_write_text(target, "old")
    storage.atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_existence_checks_retry_as_downloads_do(http_server, monkeypatch):
    http_server.add_file("gpt-2/flaky-head.txt", b"here")
    http_server.script("gpt-2/flaky-head.txt", "500")
    assert storage.exists("gs://gpt-2/flaky-head.txt")
    assert http_server.count("gpt-2/flaky-head.txt") == 2
    monkeypatch.setenv("LMHP_RETRIES", "0")
    with pytest.raises(storage.Offline, match="cannot connect after 1 attempt "):
        storage.exists("http://127.0.0.1:9/file.json")
    monkeypatch.setenv("LMHP_RETRIES", "-1")
    with pytest.raises(UserError, match="LMHP_RETRIES='-1' is not a whole number ≥ 0; fix or unset it"):
        storage.fetch("gs://gpt-2/flaky-head.txt")


def test_absent_public_files_are_remembered_and_others_asked_again(http_server):
    assert not storage.exists("gs://gpt-2/absent.json")
    assert (cache.cache_dir() / cache.NOT_FOUND).read_text() == f"{BASE}/gpt-2/absent.json\n"
    http_server.add_file("gpt-2/absent.json", b"{}")  # the archived buckets never change; the record holds
    assert not storage.exists("gs://gpt-2/absent.json")
    assert http_server.count("gpt-2/absent.json") == 1
    other = f"{http_server.url}/gpt-2/other.json"  # not the public store: never recorded
    assert not storage.exists(other)
    http_server.add_file("gpt-2/other.json", b"{}")
    assert storage.exists(other)


def test_cache_paths_mirror_the_urls():
    assert cache.cache_path(f"{BASE}/gpt-2/models/124M/hparams.json") == \
        cache.cache_dir() / "openaipublic.blob.core.windows.net/gpt-2/models/124M/hparams.json"
    assert cache.cache_path("https://user:pw@example.com:8080/a/../b/./c.json") == \
        cache.cache_dir() / "example.com:8080/a/b/c.json"
    with_query = cache.cache_path("https://example.com/x.json?v=1")
    assert with_query.name.startswith("x.json@") and with_query != cache.cache_path("https://example.com/x.json?v=2")


def test_a_mirror_folder_stands_in_for_the_public_store(tmp_path, monkeypatch):
    folder = tmp_path / "mirror"
    (folder / "gpt-2/models/x").mkdir(parents=True)
    (folder / "gpt-2/models/x/hparams.json").write_text("{}")
    monkeypatch.setenv("LMHP_MIRROR", str(folder))
    assert storage.fetch("gs://gpt-2/models/x/hparams.json").read_text() == "{}"
    assert not storage.exists("gs://gpt-2/models/x/checkpoint")
    (folder / "gpt-2/models/x/checkpoint").write_text("copied in later")  # looked for again in the folder
    assert storage.exists("gs://gpt-2/models/x/checkpoint")
    with pytest.raises(UserError, match=re.escape(f"{folder}/gpt-2/models/x/other: not in the mirror folder {folder}; "
                                                  f"mirror (LMHP_MIRROR) of {BASE}/gpt-2/models/x/other; cache file")):
        storage.fetch("gs://gpt-2/models/x/other")
