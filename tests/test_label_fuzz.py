"""Property-based tests (hypothesis) of what the labeling app and the loaders take from outside.

The server gets random and malformed requests (methods, paths, headers, cookies, bodies, ids,
labels) over a raw socket: it must answer each with a 2xx or a 4xx JSON body — never a 5xx, a
traceback or silence — keep serving, and leave valid files. The label-file and questions-file
loaders get random bytes and mutated valid files: they must load them or raise a UserError.
"""

import json
import socket
import sqlite3
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm_human_preferences.labeling import collect, label_files, label_types
from lm_human_preferences.labeling.app import questions, web
from lm_human_preferences.labeling.app.queue import LabelQueue
from lm_human_preferences.utils.errors import UserError

from test_label_app import eventually

BO4 = label_types.get("best_of_4")
VOCAB = label_files.Vocabulary(n_vocab=50257, padding_token=50259)
REQUESTS = 1500
FILES = 400  # per loader and kind of input


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def items(n: int) -> list[questions.Item]:
    return [questions.Item(collect.Question([i, 1, 2, 3], [[k, 50259] for k in range(4)], f"query {i}",
                                            [f"<b>{k}</b>" for k in range(4)]), [False, True, False, True])
            for i in range(n)]


# -- requests

PATHS = ["/", "/api/state", "/api/label", "/api/skip", "/api/undo", "/api/agreement", "/static/app.js",
         "/static/app.css", "/static/favicon.svg", "/static/../web.py", "/api/state?token=x", "/%2e%2e/etc/passwd"]
METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "get", "BREW"]
SAFE = st.characters(min_codepoint=33, max_codepoint=126)  # no whitespace: a request line stays three words
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.integers(-2, 8),
                    st.floats(allow_nan=True), st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                           max_leaves=6)
answers = st.fixed_dictionaries({}, optional={"id": st.one_of(st.integers(-1, 12), json_values),
                                              "label": st.one_of(st.integers(-1, 8), json_values)})
bodies = st.one_of(answers.map(lambda d: json.dumps(d).encode()), json_values.map(lambda v: json.dumps(v).encode()),
                   st.binary(max_size=64))


@st.composite
def requests(draw) -> bytes:
    # mostly well-formed, so that most requests reach the API with odd ids, labels and bodies
    path = draw(st.one_of(*[st.sampled_from(PATHS)] * 4, st.text(SAFE, max_size=20).map(lambda t: "/" + t)))
    proper = "POST" if path in ("/api/label", "/api/skip", "/api/undo") else "GET"
    method = draw(st.one_of(*[st.just(proper)] * 4, st.sampled_from(METHODS), st.text(SAFE, min_size=1, max_size=8)))
    version = draw(st.sampled_from(["HTTP/1.0", "HTTP/1.1"] * 5 + ["HTTP/2.0", "HTTP/x", "FTP/1.0"]))
    body = draw(bodies)
    headers = {"Host": draw(st.sampled_from(["{host}"] * 8 + ["evil.example:1", "", "localhost"]))}
    if draw(st.booleans()):
        headers["Content-Type"] = draw(st.sampled_from(["application/json", "application/json; charset=utf-8",
                                                        "text/plain", "", "application/json;;"]))
    length = draw(st.sampled_from(["exact", "exact", "none", "-1", "999999", "abc", "3"]))
    if length != "none":
        headers["Content-Length"] = str(len(body)) if length == "exact" else length
    if draw(st.booleans()):
        headers["Cookie"] = draw(st.sampled_from(["lmhp_session=" + "a" * 32, "lmhp_session=" + "b" * 32,
                                                  "lmhp_session=x; =;;", '"\\', "lmhp_token=t"]))
    for name, value in draw(st.lists(st.tuples(st.text(SAFE, min_size=1, max_size=6), st.binary(max_size=12)),
                                     max_size=2)):
        headers[name.replace(":", "")] = value
    head = f"{method} {path} {version}\r\n".encode("utf-8", "replace")
    for name, value in headers.items():
        head += name.encode() + b": " + (value if isinstance(value, bytes) else value.encode("utf-8")) + b"\r\n"
    return head + b"\r\n" + body


def send(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(raw.replace(b"{host}", f"127.0.0.1:{port}".encode()))
        s.shutdown(socket.SHUT_WR)  # a body shorter than its Content-Length ends here
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def check_response(raw: bytes) -> int:
    """The status of a whole HTTP response: 2xx, or 4xx with a JSON {"error": ...} body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("iso-8859-1").split("\r\n")
    version, status, *_ = status_line.split(" ")
    status = int(status)
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    # 505 (HTTP Version Not Supported) is the protocol's answer to a request line of HTTP/2 or later
    assert version.startswith("HTTP/1.") and (200 <= status < 300 or 400 <= status < 500 or status == 505), raw[:300]
    if status >= 400 and body:  # (HEAD gets none)
        assert headers["content-type"].startswith("application/json") and "error" in json.loads(body), raw[:300]
    return status


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    queue = LabelQueue(tmp_path_factory.mktemp("fuzz") / "labels.json", BO4, overlap=0.5)
    queue.add(items(12))
    server = web.LabelServer(queue, web.Page("fuzz", "Pick."), "127.0.0.1", 0)
    server.start()
    yield server
    server.shutdown()
    server.server_close()
    queue.close()


STATUSES: Counter = Counter()


@fuzz(REQUESTS)
@given(raw=requests())
def test_random_requests_get_2xx_or_4xx_json(server, raw):
    STATUSES[check_response(send(server.server_address[1], raw))] += 1


def test_after_the_fuzz_the_server_serves_and_the_files_are_valid(server):
    assert sum(STATUSES.values()) > REQUESTS // 2, STATUSES  # (hypothesis leaves out repeats)
    print(f"fuzzed requests by status: {dict(sorted(STATUSES.items()))}")
    port = server.server_address[1]
    assert check_response(send(port, f"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())) == 200
    queue = server.queue
    labelled = queue.progress()["labelled"]  # the queue writes its files within seconds by itself
    if labelled:
        assert eventually(lambda: len(label_files.load(str(queue.out), BO4, 4, 2, VOCAB)) if queue.out.exists()
                          else None, labelled) == labelled
    assert eventually(lambda: questions.load(queue.paths["questions.json"]) if queue.paths["questions.json"].exists()
                      else None, ("best_of_4", items(12))) == ("best_of_4", items(12))
    copy = queue.out.with_name("copy.json")  # the database replays (a copy: the server holds it)
    with sqlite3.connect(queue.paths["sqlite"]) as source, sqlite3.connect(f"{copy}.sqlite") as target:
        source.backup(target)
    again = LabelQueue(copy, BO4, overlap=0.5)
    assert again.progress() == queue.progress() and again.agreement() == queue.agreement()
    again.close()


# -- files


def valid_label_file() -> bytes:
    return json.dumps([dict(query=[i, 1, 2, 3], sample0=[0, 50259], sample1=[1, 2], sample2=[3, 4], sample3=[5, 6],
                            best=i % 4) for i in range(3)]).encode()


def valid_questions_file() -> bytes:
    return questions.to_json(BO4, items(2)).encode()


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """`valid` with a few bytes replaced, inserted or deleted, or cut short."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["replace", "insert", "delete", "cut"]))
        new = draw(st.sampled_from([b"[", b"]", b"{", b"}", b",", b'"', b"-", b"9" * 5000, b"\xff", b"1e999", b"null",
                                    b"NaN", b"true", b" ", b"\\"]))
        if kind == "replace":
            data[at:at + 1] = new
        elif kind == "insert":
            data[at:at] = new
        elif kind == "delete":
            del data[at:at + 3]
        else:
            del data[at:]
    return bytes(data)


def load_labels(path) -> None:
    label_files.load(str(path), BO4, 4, 2, VOCAB)


def load_questions(path) -> None:
    questions.load(path)


@pytest.mark.parametrize("load, valid", [(load_labels, valid_label_file), (load_questions, valid_questions_file)])
def test_loaders_take_random_and_mutated_files_or_say_why(tmp_path, load, valid):
    path = tmp_path / "file.json"
    outcomes: Counter = Counter()

    @fuzz(FILES)
    @given(data=st.one_of(st.binary(max_size=200), mutated(valid())))
    def check(data):
        path.write_bytes(data)
        try:
            load(path)
            outcomes["loaded"] += 1
        except UserError as e:
            assert "\n" not in str(e)
            outcomes["UserError"] += 1

    check()
    assert sum(outcomes.values()) > FILES // 2
    print(f"{load.__name__}: {dict(outcomes)}")
