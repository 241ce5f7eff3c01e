"""The labeling app: a local web page where people answer a `LabelQueue`'s questions.

`label.py serve EXPERIMENT --out FILE` samples the questions (or reads prepared ones), serves
the page and prints progress until Ctrl-C. The page talks to a small JSON API:

    GET  /api/state      {question, progress, agreement, can_undo, ...} for this browser session
    POST /api/label      {"id": question id, "label": response index 0..N-1, or rating 1..7}
    POST /api/skip       {"id": question id}
    POST /api/undo       {}
    GET  /api/agreement  the agreement of doubly-labelled questions

Each browser gets a session cookie, which is the labeler's identity. By default the server
binds 127.0.0.1; any other host needs a token, which every request must carry (in the URL's
`?token=`, after which a cookie keeps it, or the X-Token header). Errors are JSON
`{"error": reason}` with a 4xx status.
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

from lm_human_preferences import cli, experiments
from lm_human_preferences.labeling import label_types, mock_labelers, questions
from lm_human_preferences.labeling.queue import BadAnswer, Conflict, LabelQueue
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.policy import Policy
from lm_human_preferences.utils import distributed
from lm_human_preferences.utils.errors import UserError

SERVE_HELP = """\
usage: label.py serve EXPERIMENT --out FILE [--n N] [--type best_of_4|scalar_rating] [--policy MODEL]
                      [--questions FILE] [--port P] [--host H --token T] [--overlap F] [--seed S]
                      [--instructions TEXT] [--<task.hparam> VALUE ...]

Serve a web page on which people label the policy's samples. The train_reward EXPERIMENT
gives the task and the label type. Labels go to FILE in the released schema as soon as they
are given; FILE.questions.json keeps the questions and FILE.journal.jsonl every answer, so a
restart with the same --out goes on where it stopped. Ctrl-C stops.

options:
  --out FILE          the label file to write
  --n N               questions to sample (default 100); ignored when FILE.questions.json exists
  --type T            best_of_N (pick the best of N responses) or scalar_rating (rate one response
                      1..7) (default: the experiment's labels.type)
  --policy MODEL      the policy that answers (default: task.policy.initial_model)
  --questions FILE    prepared questions (a questions file) instead of sampling
  --port P            port (default 8000; 0 picks a free one)
  --host H            address to bind (default 127.0.0.1); any other needs --token
  --token T           a secret every request must carry: open the printed URL with ?token=T
  --overlap F         share of questions given to two labelers, for their agreement (default 0);
                      FILE gets the first label, FILE.overlap.json the second
  --seed S            random seed of the samples and of the overlapped questions (default 0)
  --instructions TEXT the task shown to labelers (default: from the experiment)
"""

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
DEFAULT_PORT = 8000

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
    name = mock_labelers.parse_source(labels_source)[0] if labels_source.startswith(mock_labelers.MOCK_PREFIX) \
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

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/" + (f"?token={self.token}" if self.token else "")

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="label-server", daemon=True)
        thread.start()
        return thread


class Handler(http.server.BaseHTTPRequestHandler):
    server: LabelServer
    server_version = "lmhp-label"

    def log_message(self, format, *args):  # progress is printed by the command, not per request
        pass

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, unknown method) as JSON too."""
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
            self._check_token(parse_qs(url.query).get("token", [None])[0])
            self._route(method, url.path)
        except HTTPError as e:
            self._send_json(e.status, {"error": str(e)})
        except BadAnswer as e:
            self._send_json(400, {"error": str(e)})
        except Conflict as e:
            self._send_json(409, {"error": str(e)})
        except ConnectionError:  # the browser went away
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

def progress_line(queue: LabelQueue) -> str:
    p, a = queue.progress(), queue.agreement()
    line = f"labelled {p['labelled']}/{p['questions']} questions, skipped {p['skipped']}"
    if p["overlapped"]:
        line += f"; agreement {agreement_text(a)}"
    return line


def agreement_text(a: dict) -> str:
    if not a["doubly_labelled"]:
        return "none yet (no question labelled twice)"
    text = f"{a['rate']:.2f} ({a['agreed']}/{a['doubly_labelled']} {a['rule']}"
    if "within_one_rate" in a:
        text += f"; within one point {a['within_one_rate']:.2f}"
    return text + ")"


def _parse_number(flags: dict[str, str], key: str, kind: type, default):
    if key not in flags:
        return default
    try:
        return kind(flags.pop(key))
    except ValueError:
        raise UserError(f"--{key} needs {'an integer' if kind is int else 'a number'}") from None


def _fill(queue: LabelQueue, hp, given: str | None, policy_name: str | None, n: int, seed: int) -> None:
    """Give an empty queue its questions: from the file `given`, else sampled from the policy."""
    n_responses = questions.count_responses(queue.label_type)
    if queue.items:
        print(f"{len(queue.items)} questions from {queue.paths['questions.json']}; answers so far from "
              f"{queue.paths['journal.jsonl']}")
        items = questions.load(Path(given))[1] if given else None
        if items is not None and items != queue.items:
            raise UserError(f"--questions {given} differs from {queue.paths['questions.json']}, which this label "
                            "file was started with; choose another --out")
        return
    if given:
        type_name, items = questions.load(Path(given))
        if type_name != queue.label_type.name:
            raise UserError(f"{given} holds {type_name} questions; serve them with --type {type_name}")
        questions.check(items, n_responses, hp.task.query_length, hp.task.response_length, given)
    else:
        policy_name = policy_name or hp.task.policy.initial_model
        print(f"sampling {n} queries × {n_responses} responses from {policy_name} …", flush=True)
        model, encoding_name = trained_models.load_initial(policy_name, device=distributed.device())
        policy = Policy(model.eval(), encodings.get(encoding_name), hp.task)
        items = questions.prepare(policy, hp.task, n, n_responses, seed, hp.run.chunk_size)
    queue.add(items)


def serve_command(args: list[str]) -> None:
    if not args or "--help" in args or "-h" in args:
        print(SERVE_HELP)
        return
    if args[0].startswith("--"):
        raise UserError("usage: label.py serve EXPERIMENT --out FILE [--flags] (see label.py serve --help)")
    experiment = args[0]
    hp = experiments.get("train_reward", experiment)
    flags = cli.parse_flags(args[1:], booleans=set())
    if "out" not in flags:
        raise UserError("label.py serve needs --out FILE")
    out = Path(flags.pop("out"))
    n = _parse_number(flags, "n", int, 100)
    seed = _parse_number(flags, "seed", int, 0)
    port = _parse_number(flags, "port", int, DEFAULT_PORT)
    overlap = _parse_number(flags, "overlap", float, 0.0)
    host, token = flags.pop("host", "127.0.0.1"), flags.pop("token", None)
    label_type = label_types.get(flags.pop("type", hp.labels.type))
    questions.count_responses(label_type)
    text = flags.pop("instructions", None) or instructions(experiment, hp.labels.source, label_type)
    given, policy_name = flags.pop("questions", None), flags.pop("policy", None)
    check_bind(host, token)
    for key, value in flags.items():
        if not key.startswith("task."):
            raise UserError(f"unknown option --{key} (see label.py serve --help)")
        hp.override_from_str(key, value)
    hp.task.validate("task.")
    if n <= 0:
        raise UserError("--n must be positive")

    queue = LabelQueue(out, label_type, overlap, seed)
    try:
        _fill(queue, hp, given, policy_name, n, seed)
        server = LabelServer(queue, Page(f"{experiment}: {label_type.name}", text), host, port, token)
        server.start()
        print(f"labeling app for {experiment} ({label_type.name}) → {out}\nopen {server.url}\nCtrl-C stops",
              flush=True)
        try:
            _report_progress(queue)
        except KeyboardInterrupt:
            pass
        server.shutdown()
        server.server_close()
    finally:
        queue.close()
    print(f"\nstopped: {progress_line(queue)}; labels in {out}")
    if queue.overlap > 0:
        print(f"agreement of doubly-labelled questions: {agreement_text(queue.agreement())}; second labels in "
              f"{queue.paths['overlap.json']}")


def _report_progress(queue: LabelQueue) -> None:
    """Print a line whenever the progress changes, until Ctrl-C."""
    version, last = -1, ""
    while True:
        version = queue.wait_for_change(version, timeout=1.0)
        line = progress_line(queue)
        if line != last:
            print(line, flush=True)
            last = line
