"""Downloads from a misbehaving server: only complete files ever reach the cache.

A server of its own (on 127.0.0.1, standing in for LMHP_MIRROR) answers each path in one of
these ways: 'sized' (the body with its Content-Length), 'unsized' (the body, no
Content-Length, end marked by closing the connection), 'short' (the whole body's
Content-Length, then half the body), 'stall' (the headers, then silence), 'md5' and 'wrong_md5'
(sized, with the body's Content-MD5 or another body's).
"""

import base64
import gzip
import hashlib
import http.server
import json
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lm_human_preferences.language.tf_checkpoint import TABLE_MAGIC
from lm_human_preferences.utils import cache, storage
from lm_human_preferences.utils.errors import UserError

# How long a stalled answer stays silent before sending the body after all, so that a client
# without a download timeout finishes (and the test fails) instead of hanging.
STALL_S = 5.0


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "FaultServer"

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        if path not in self.server.files:
            self.send_error(404)
            return
        body, mode = self.server.files[path]
        self.send_response(200)
        if mode != "unsized":
            self.send_header("Content-Length", str(len(body)))
        if mode in ("md5", "wrong_md5"):
            digest = hashlib.md5(body if mode == "md5" else body + b"!").digest()
            self.send_header("Content-MD5", base64.b64encode(digest).decode())
        self.end_headers()
        if mode == "short":
            body = body[: len(body) // 2]
        if mode == "stall":
            self.wfile.flush()
            self.server.release.wait(STALL_S)
        self.wfile.write(body)


class FaultServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.release = threading.Event()

    def handle_error(self, request, client_address):
        """Stay quiet when a stalled answer finally writes to a client that gave up."""

    def serve(self, path: str, body: bytes, mode: str = "sized") -> str:
        """Answer GET /`path` with `body` in `mode`; the gs:// path that fetches it."""
        self.files["/" + path] = (body, mode)
        return f"gs://{path}"

    def contacted(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"


@pytest.fixture
def server(monkeypatch) -> Iterator[FaultServer]:
    server = FaultServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("LMHP_MIRROR", f"http://127.0.0.1:{server.server_address[1]}")
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def _cache_file(gs_path: str) -> Path:
    return cache.cache_path(storage.canonical_url(gs_path))


def _message(server: FaultServer, path: str, problem: str, advice: str) -> str:
    """The error expected for `path`: URL contacted, problem, URL mirrored, cache file, advice."""
    gs_path = f"gs://{path}"
    return (f"{server.contacted(path)}: {problem}; mirror (LMHP_MIRROR) of {storage.canonical_url(gs_path)}; "
            f"cache file {_cache_file(gs_path)}; {advice}")


def _cache_contents(tmp_path: Path) -> list[str]:
    records = (cache.SHA256SUMS, cache.NOT_FOUND)  # the cache's own lists, at its root
    return sorted(p.name for p in (tmp_path / "cache").rglob("*")
                  if p.is_file() and not p.name.endswith(".lock") and p.name not in records)


def _safetensors(data: bytes) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(data) // 4], "data_offsets": [0, len(data)]}}).encode()
    return struct.pack("<Q", len(header)) + header + data


SAFETENSORS = _safetensors(bytes(range(64)))
TF_INDEX = b"\x01" * 40 + struct.pack("<Q", TABLE_MAGIC)
GZ = gzip.compress(b"some text\n" * 200)

# Per checked suffix: a whole file, and the same file cut where only the format's check notices.
COMPLETE_AND_CUT = {
    "json": (b'{"a": [1, 2, 3]}', b'{"a": [1, 2'),
    "gz": (GZ, GZ[:-4]),  # the trailer's length field missing
    "safetensors": (SAFETENSORS, SAFETENSORS[:-8]),  # header intact, tensor data short
    "index": (TF_INDEX, TF_INDEX[:-3]),
}


@pytest.mark.parametrize("suffix", sorted(COMPLETE_AND_CUT))
def test_cut_body_without_content_length_is_never_cached(server, tmp_path, suffix):
    path = f"gpt-2/cut/file.{suffix}"
    gs_path = server.serve(path, COMPLETE_AND_CUT[suffix][1], mode="unsized")
    expected = _message(server, path, f"download failed after 2 attempts (the body came without Content-Length "
                        f"and is not a complete .{suffix} file)", "check your network or try again later")
    with pytest.raises(UserError, match=re.escape(expected)):
        storage.fetch(gs_path, retries=1, backoff=0.01)
    assert _cache_contents(tmp_path) == []


@pytest.mark.parametrize("suffix", [*sorted(COMPLETE_AND_CUT), "bin"])
def test_whole_body_without_content_length_is_cached(server, suffix):
    body = COMPLETE_AND_CUT[suffix][0] if suffix in COMPLETE_AND_CUT else b"no check for this type"
    gs_path = server.serve(f"gpt-2/whole/file.{suffix}", body, mode="unsized")
    assert storage.fetch(gs_path, retries=0).read_bytes() == body


def test_short_body_with_content_length_is_never_cached(server, tmp_path):
    path = "gpt-2/short/file.bin"
    gs_path = server.serve(path, b"x" * 1000, mode="short")
    expected = _message(server, path, "download failed after 2 attempts (connection closed after 500 of 1000 bytes)",
                        "check your network or try again later")
    with pytest.raises(UserError, match=re.escape(expected)):
        storage.fetch(gs_path, retries=1, backoff=0.01)
    assert _cache_contents(tmp_path) == []


def test_stalled_server_is_given_up_on_after_the_download_timeout(server, tmp_path, monkeypatch):
    monkeypatch.setenv("LMHP_DOWNLOAD_TIMEOUT", "2")
    path = "gpt-2/stall/file.bin"
    gs_path = server.serve(path, b"late", mode="stall")
    # the last attempt's own failure (in parentheses) depends on where the 0.1 s read timeout hit
    expected = re.escape(_message(server, path, "no data within LMHP_DOWNLOAD_TIMEOUT=2 s (REASON)",
                                  "check your network, try again later or raise LMHP_DOWNLOAD_TIMEOUT"))
    expected = expected.replace("REASON", "[^;]*")
    with pytest.raises(UserError, match=expected):
        storage.fetch(gs_path, retries=1000, backoff=0.01)
    assert _cache_contents(tmp_path) == []


def test_bad_download_timeout_is_a_clear_error(server, monkeypatch):
    monkeypatch.setenv("LMHP_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(UserError, match="LMHP_DOWNLOAD_TIMEOUT='soon' is not a positive number of seconds"):
        storage.fetch(server.serve("gpt-2/any.bin", b"x"))


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_partial_file_of_a_killed_download_is_removed_on_next_fetch(server, tmp_path):
    gs_path = server.serve("gpt-2/killed/file.bin", b"whole file", mode="stall")
    code = f"from lm_human_preferences.utils import storage; storage.fetch({gs_path!r})"
    downloader = subprocess.Popen([sys.executable, "-c", code])
    partial = _cache_file(gs_path).with_name(_cache_file(gs_path).name + f".partial-{downloader.pid}")
    try:
        _wait_for(partial)
    finally:
        downloader.send_signal(signal.SIGKILL)
        downloader.wait()
    assert partial.exists()
    server.serve("gpt-2/killed/file.bin", b"whole file")
    assert storage.fetch(gs_path).read_bytes() == b"whole file"
    assert _cache_contents(tmp_path) == [_cache_file(gs_path).name]


def test_partial_file_of_a_live_process_is_kept(server, tmp_path):
    gs_path = server.serve("gpt-2/live/file.bin", b"whole file")
    target = _cache_file(gs_path)
    target.parent.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # what a downloader leaves: its PID in the entry's lock file, and its temporary file
        cache.lock_path(target).parent.mkdir(parents=True)
        cache.lock_path(target).write_text(f"{live.pid}\n")
        partial = target.with_name(f"{target.name}.partial-{live.pid}")
        partial.write_bytes(b"half")
        assert storage.fetch(gs_path).read_bytes() == b"whole file"
        assert partial.read_bytes() == b"half"
    finally:
        live.kill()
        live.wait()


def test_a_body_that_does_not_match_its_content_md5_is_never_cached(server, tmp_path):
    path = "gpt-2/md5/file.bin"
    gs_path = server.serve(path, b"payload" * 100, mode="wrong_md5")
    expected = _message(server, path, "download failed after 2 attempts (the body does not match its Content-MD5 "
                        "header)", "check your network or try again later")
    with pytest.raises(UserError, match=re.escape(expected)):
        storage.fetch(gs_path, retries=1, backoff=0.01)
    assert _cache_contents(tmp_path) == []
    server.serve(path, b"payload" * 100, mode="md5")
    assert storage.fetch(gs_path, retries=0).read_bytes() == b"payload" * 100
