"""The labeling app: a local web page where people answer a `LabelQueue`'s questions.

`label.py serve` (lm_human_preferences/serve.py) fills the queue and runs this server. The page talks to a small JSON API:

    GET  /api/state      {question, progress, agreement, can_undo, ...} for this browser session
    POST /api/label      {"id": question id, "label": response index 0..N-1, or rating 1..7}
    POST /api/skip       {"id": question id}
    POST /api/undo       {}
    GET  /api/agreement  the agreement of doubly-labelled questions: raw, by chance, kappa, per labeler

Each browser gets a session cookie, which is the labeler's identity. By default the server
binds 127.0.0.1 and answers only requests whose Host header names it (the bound address,
localhost or 127.0.0.1, with the port): a web page whose name was rebound to 127.0.0.1 (DNS
rebinding) gets 403, not the questions. Any other host needs a token, which every request
must carry (in the URL's `?token=`, after which a cookie keeps it, or the X-Token header);
such a server answers any Host. Errors are JSON `{"error": reason}` with a 4xx status (503
while the app stops).
"""

import hmac
import http.cookies
import http.server
import ipaddress
import json
import re
import secrets
import socket
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from lm_human_preferences.labeling import label_types, mock_labelers, sources
from lm_human_preferences.labeling.app.assignment import BadAnswer, Conflict
from lm_human_preferences.labeling.app.queue import Closed, LabelQueue
from lm_human_preferences.utils.errors import UserError

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
                "/static/app.css": ("app.css", "text/css; charset=utf-8"),
                "/static/favicon.svg": ("favicon.svg", "image/svg+xml")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
SESSION_COOKIE, TOKEN_COOKIE = "lmhp_session", "lmhp_token"
MAX_BODY = 64 * 1024
DEFAULT_PORT = sources.DEFAULT_APP_PORT
SHUTDOWN_POLL_S = 0.1  # how soon `shutdown` takes effect (http.server's default is 0.5 s)

INSTRUCTIONS = {  # (best_of_N, scalar_rating) by mock labeler or experiment name
    "descriptiveness": ("Pick the most descriptive continuation: vivid, rich in adjectives and adverbs.",
                        "Rate how descriptive the continuation is: 1 not at all … 7 very vivid."),
    "sentiment": ("Pick the continuation with the most positive sentiment.",
                  "Rate the sentiment of the continuation: 1 very negative … 7 very positive."),
    "tldr": ("Pick the best summary of the text.", "Rate the summary: 1 useless … 7 excellent."),
    "cnndm": ("Pick the best summary of the article.", "Rate the summary: 1 useless … 7 excellent."),
}
GENERIC_INSTRUCTIONS = ("Pick the best continuation of the text.", "Rate the continuation: 1 very bad … 7 very good.")


@dataclass
class Page:
    """What the page shows besides the questions."""

    title: str
    instructions: str


def instructions(experiment: str, labels_source: str, label_type: label_types.LabelType) -> str:
    """The task for labelers, from the experiment's mock labeler or its name, else a generic one."""
    name = mock_labelers.parse_source(labels_source)[0] if sources.is_mock(labels_source) \
        else experiment
    pick, rate = INSTRUCTIONS.get(name, GENERIC_INSTRUCTIONS)
    return rate if isinstance(label_type, label_types.ScalarRating) else pick


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Serving beyond this machine needs a token, or anyone who reaches the port could label."""
    if not is_loopback(host) and not token:
        raise UserError(f"--host {host} serves other machines: give a secret --token T too (requests without it "
                        "are refused); without --host the app serves this machine only")
    if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
        raise UserError("--token may hold letters, digits and . _ ~ - only (it travels in URLs and cookies)")


class HTTPError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class LabelServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: at the default 5, a burst of labelers waits for SYN retries (1 s)

    def __init__(self, queue: LabelQueue, page: Page, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None):
        check_bind(host, token)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.queue, self.page, self.token = queue, page, token
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            raise UserError(f"cannot serve on {host}:{port} ({e.strerror}); choose another --port (0: any free one)") \
                from None
        self.allowed_hosts = None if token and not is_loopback(host) else self._local_hosts()

    def _local_hosts(self) -> set[str]:
        """The Host headers of requests for this server: its address, localhost or 127.0.0.1, with the port."""
        host, port = self.server_address[:2]
        names = {f"[{n}]" if ":" in n else n for n in (host, "localhost", "127.0.0.1")}
        return {f"{n}:{port}" for n in names} | (names if port == 80 else set())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/" + (f"?token={self.token}" if self.token else "")

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, args=(SHUTDOWN_POLL_S,), name="label-server", daemon=True)
        thread.start()
        return thread


class Handler(http.server.BaseHTTPRequestHandler):
    server: LabelServer
    server_version = "lmhp-label"
    timeout = 60  # a client that stops sending mid-request does not hold its thread for ever

    def log_message(self, format, *args):  # progress is printed by the command, not per request
        pass

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, unknown method) as JSON too."""
        if self.request_version == "HTTP/0.9":  # a request line it could not read: answer with a status line
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        if code == http.HTTPStatus.NOT_IMPLEMENTED:  # a method it has no do_ for: the client's mistake
            code, message = http.HTTPStatus.METHOD_NOT_ALLOWED, f"unknown method {self.command!r}; use GET or POST"
        self._send_json(code, {"error": message or http.HTTPStatus(code).phrase})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_HEAD(self):
        self._handle("GET")  # `_send` leaves the body out

    def do_PUT(self):
        self._handle("PUT")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        self._cookies_out: list[str] = []
        try:
            url = urlsplit(self.path)
            self._check_host()
            self._check_token(parse_qs(url.query).get("token", [None])[0])
            self._route(method, url.path)
        except HTTPError as e:
            self._send_json(e.status, {"error": str(e)})
        except BadAnswer as e:
            self._send_json(400, {"error": str(e)})
        except Conflict as e:
            self._send_json(409, {"error": str(e)})
        except Closed as e:
            self._send_json(503, {"error": str(e)})
        except (ConnectionError, TimeoutError):  # the browser went away, or stopped sending
            pass
        except Exception as e:  # the labeler sees a reason; the operator the traceback
            traceback.print_exc(file=sys.stderr)
            reason = str(e) if isinstance(e, UserError) else "internal error; see the server's output"
            self._send_json(500, {"error": reason})

    # -- request parts

    def _cookies(self) -> http.cookies.SimpleCookie:
        try:
            return http.cookies.SimpleCookie(self.headers.get("Cookie", ""))
        except http.cookies.CookieError:
            return http.cookies.SimpleCookie()

    def _set_cookie(self, name: str, value: str) -> None:
        # Lax: a link opened from elsewhere keeps the labeler's session; other sites' POSTs carry no cookie
        self._cookies_out.append(f"{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age=31536000")

    def _check_host(self) -> None:
        allowed = self.server.allowed_hosts
        if allowed is not None and self.headers.get("Host", "").lower() not in allowed:
            raise HTTPError(403, "this server answers requests for this machine only: open the address it printed "
                                 "(a page of another site that reaches it through a rebound name gets nothing)")

    def _check_token(self, from_url: str | None) -> None:
        token = self.server.token
        if not token:
            return
        cookie = self._cookies().get(TOKEN_COOKIE)
        for given in (from_url, self.headers.get("X-Token"), cookie.value if cookie else None):
            if given and hmac.compare_digest(given.encode(), token.encode()):
                if given == from_url:
                    self._set_cookie(TOKEN_COOKIE, token)
                return
        raise HTTPError(403, "this server needs its token: open the URL it printed (…/?token=…)")

    def _session(self) -> str:
        cookie = self._cookies().get(SESSION_COOKIE)
        if cookie and re.fullmatch(r"[0-9a-f]{32}", cookie.value):
            return cookie.value
        session = secrets.token_hex(16)
        self._set_cookie(SESSION_COOKIE, session)
        return session

    def _body(self) -> dict:
        if self.headers.get_content_type() != "application/json":
            raise HTTPError(415, "send the request body as Content-Type: application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise HTTPError(411, "the request needs a Content-Length") from None
        if not 0 <= length <= MAX_BODY:
            raise HTTPError(413, f"the request body must be at most {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the request body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return body

    @staticmethod
    def _field(body: dict, key: str):
        if key not in body:
            raise HTTPError(400, f"the request body lacks {key!r}")
        return body[key]

    # -- routes

    def _route(self, method: str, path: str) -> None:
        queue = self.server.queue
        if path in STATIC_FILES:
            self._allow(method, "GET")
            self._session()
            name, content_type = STATIC_FILES[path]
            self._send(200, (STATIC / name).read_bytes(), content_type)
        elif path == "/api/state":
            self._allow(method, "GET")
            self._send_json(200, self._state(self._session()))
        elif path == "/api/agreement":
            self._allow(method, "GET")
            self._send_json(200, queue.agreement())
        elif path in ("/api/label", "/api/skip"):
            self._allow(method, "POST")
            body = self._body()
            session = self._session()
            if path == "/api/label":
                queue.label(session, self._field(body, "id"), self._field(body, "label"))
            else:
                queue.skip(session, self._field(body, "id"))
            self._send_json(200, self._state(session))
        elif path == "/api/undo":
            self._allow(method, "POST")
            self._body()
            session = self._session()
            queue.undo(session)
            self._send_json(200, self._state(session))
        else:
            raise HTTPError(404, f"no page {path}")

    @staticmethod
    def _allow(method: str, allowed: str) -> None:
        if method != allowed:
            raise HTTPError(405, f"use {allowed} here")

    def _state(self, session: str) -> dict:
        queue = self.server.queue
        qid = queue.next_question(session)
        question = None
        if qid is not None:
            item = queue.items[qid]
            question = dict(id=qid, query=item.question.query_text,
                            responses=[dict(text=t, ended=e) for t, e in zip(item.question.response_texts, item.ended)])
        rating = isinstance(queue.label_type, label_types.ScalarRating)
        return dict(title=self.server.page.title, instructions=self.server.page.instructions,
                    label_type=queue.label_type.name, kind="rating" if rating else "best_of",
                    labels=list(queue.labels), question=question, progress=queue.progress(session),
                    agreement=queue.agreement(), can_undo=queue.can_undo(session))

    # -- responses

    def _send_json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        for cookie in getattr(self, "_cookies_out", []):
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


# -- the command
