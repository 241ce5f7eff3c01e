"""The labeling app over HTTP: labels, skips, undo, restarts, overlap, tokens, bad requests, the files."""

import http.cookiejar
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lm_human_preferences import experiments
from lm_human_preferences.cli import main as cli
from lm_human_preferences.labeling import collect, label_files, label_types
from lm_human_preferences.labeling.app import questions, web
from lm_human_preferences.labeling.app.people import PeopleLabeler
from lm_human_preferences.labeling.app.queue import LabelQueue
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.task.policy import Policy
from lm_human_preferences.utils.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def policy_of(experiment: str):
    hp = experiments.get("train_reward", experiment)
    model, encoding_name = trained_models.load_initial(hp.task.policy.initial_model)
    return hp, Policy(model.eval(), encodings.get(encoding_name), hp.task)


def new_queue(out: Path, type_name: str = "best_of_4", n: int = 6, overlap: float = 0.0,
              experiment: str = "test") -> LabelQueue:
    """A queue on `out`, given `n` questions from the experiment's initial policy when it has none yet."""
    label_type = label_types.get(type_name)
    queue = LabelQueue(out, label_type, overlap, seed=0)
    if not queue.items:
        hp, policy = policy_of(experiment)
        queue.add(questions.prepare(policy, hp.task, n, questions.count_responses(label_type), 0, None))
    return queue


@contextmanager
def serving(queue: LabelQueue, token: str | None = None):
    server = web.LabelServer(queue, web.Page("test", "Pick the best."), "127.0.0.1", 0, token)
    server.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        queue.close()


class Client:
    """One browser session: its own cookies."""

    def __init__(self, url: str):
        self.base = url.split("?")[0]
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.base + path.lstrip("/"), data=body, method=method, headers=headers or {})
        try:
            with self.opener.open(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            assert e.headers.get_content_type() == "application/json"
            return e.code, json.loads(e.read())

    def get(self, path: str) -> dict:
        status, data = self.request("GET", path)
        assert status == 200, data
        return data

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        return self.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def state(self) -> dict:
        return self.get("/api/state")

    def label(self, label: int) -> dict:
        qid = self.state()["question"]["id"]
        status, data = self.post("/api/label", {"id": qid, "label": label})
        assert status == 200, data
        return data


def load_for_training(path: Path, experiment: str = "test", type_name: str = "best_of_4") -> label_files.Labels:
    """The file read back as train_reward reads it: the task's lengths and the model's vocabulary."""
    hp, policy = policy_of(experiment)
    encoding = policy.encoding
    return label_files.load(str(path), label_types.get(type_name), hp.task.query_length, hp.task.response_length,
                            label_files.Vocabulary(encoding.n_vocab, encoding.padding_token))


def expected_records(queue: LabelQueue, answers: list[tuple[int, int]]) -> list[dict]:
    return [collect.record(queue.items[qid].question, label) for qid, label in answers]


def stored_events(out: Path) -> list[tuple]:
    """(kind, question) of every event in the app's database, in order."""
    with sqlite3.connect(out.with_name(out.name + ".sqlite")) as db:
        return db.execute("SELECT kind, question FROM events ORDER BY seq").fetchall()


def eventually(read: Callable[[], Any], expected: Any, wait_s: float = 60.0) -> Any:
    """`read()` once it gives `expected` (the queue writes its files within seconds by itself), or
    what it gives after `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def written(queue: LabelQueue, expected: list[dict]) -> list[dict]:
    """The label file once it holds `expected`, or as it is after a while."""
    return eventually(lambda: json.loads(queue.out.read_text()) if queue.out.exists() else None, expected)


def test_label_skip_undo_and_the_file(tmp_path):
    out = tmp_path / "labels.json"
    with serving(new_queue(out)) as server:
        queue, client = server.queue, Client(server.url)
        state = client.state()
        assert state["question"]["id"] == 0 and len(state["question"]["responses"]) == 4
        assert state["kind"] == "best_of" and state["labels"] == [0, 1, 2, 3] and not state["can_undo"]
        assert state["question"]["query"] == queue.items[0].question.query_text
        assert [r["text"] for r in state["question"]["responses"]] == queue.items[0].question.response_texts
        state = client.label(1)
        assert state["question"]["id"] == 1 and state["can_undo"] and state["progress"]["labelled"] == 1
        status, state = client.post("/api/skip", {"id": 1})
        assert status == 200 and state["question"]["id"] == 2 and state["progress"]["skipped"] == 1
        client.label(3)
        status, state = client.post("/api/undo", {})  # takes back the 3 on question 2
        assert status == 200 and state["question"]["id"] == 2
        expected = expected_records(queue, [(0, 1)])
        assert written(queue, expected) == expected  # the undo is in the file too
        client.label(0)
        status, state = client.post("/api/undo", {})
        status, state = client.post("/api/undo", {})  # and the skip of question 1
        assert state["question"]["id"] == 1
        client.label(2)
        client.label(2)  # question 2 again
        assert client.state()["question"]["id"] == 3
        answers = [(0, 1), (1, 2), (2, 2)]
        assert written(queue, expected_records(queue, answers)) == expected_records(queue, answers)
        assert state["progress"]["questions"] == 6

    labels = load_for_training(out)
    assert len(labels) == 3
    for i, (qid, label) in enumerate(answers):
        question = queue.items[qid].question
        assert labels.columns["query"][i].tolist() == question.query
        for k in range(4):
            assert labels.columns[f"sample{k}"][i].tolist() == question.responses[k]
        assert labels.columns["best"][i] == label
    assert labels.columns["best"].dtype == np.int64
    assert [kind for kind, _ in stored_events(out)] == ["answer", "answer", "answer", "undo", "answer", "undo", "undo",
                                                        "answer", "answer"]


def test_restart_goes_on_where_it_stopped(tmp_path):
    out = tmp_path / "labels.json"
    with serving(new_queue(out, n=5)) as server:
        first, other = Client(server.url), Client(server.url)
        for label in (0, 1, 2):
            first.label(label)
        assert other.state()["question"]["id"] == 4  # 3 is with the first labeler
        cookies = list(first.jar)
        prepared = list(server.queue.items)

    with serving(new_queue(out)) as server:
        assert server.queue.items == prepared  # the same questions, not sampled again
        assert server.queue.progress()["labelled"] == 3
        again = Client(server.url)
        for cookie in cookies:
            again.jar.set_cookie(cookie)
        fresh = Client(server.url)
        assert fresh.state()["question"]["id"] == 3
        status, _ = again.post("/api/label", {"id": 4, "label": 3})  # the page it was shown before the restart
        assert status == 200
        assert again.state()["question"] is None
        status, data = again.post("/api/label", {"id": 3, "label": 3})
        assert status == 409 and "not the one" in data["error"]
        fresh.label(0)
        assert again.state()["question"] is None and fresh.state()["question"] is None
        assert again.state()["progress"]["complete"] == 5
    labels = load_for_training(out)
    assert labels.columns["best"].tolist() == [0, 1, 2, 3, 0]
    assert [qid for _, qid in stored_events(out)] == [0, 1, 2, 4, 3]


def test_two_labelers_overlap_and_their_agreement(tmp_path):
    out = tmp_path / "labels.json"
    with serving(new_queue(out, n=4, overlap=1.0)) as server:
        a, b = Client(server.url), Client(server.url)
        picks_a, picks_b = [0, 1, 2, 3], [0, 1, 0, 3]  # they agree on 3 of 4
        for pick_a, pick_b in zip(picks_a, picks_b):
            assert a.state()["question"]["id"] == b.state()["question"]["id"]
            a.label(pick_a)
            b.label(pick_b)
        assert a.state()["question"] is None
        agreement = a.get("/api/agreement")
        # by hand: first labels 0,1,2,3 (a quarter each), second 0,1,0,3 (½, ¼, 0, ¼): chance ¼·½ + ¼·¼ + ¼·¼ = ¼
        assert agreement == dict(doubly_labelled=4, agreed=3, rate=0.75, rule="same best response", chance=0.25,
                                 kappa=pytest.approx(2 / 3),
                                 labelers=[dict(labeler=n, labelled=4, skipped=0, doubly_labelled=4, agreed=3,
                                                rate=0.75) for n in (1, 2)])
        assert a.state()["agreement"]["rate"] == 0.75 and a.state()["progress"]["labeler"] == 1
        queue = server.queue
    assert json.loads(out.read_text()) == expected_records(queue, list(enumerate(picks_a)))
    assert json.loads((tmp_path / "labels.json.overlap.json").read_text()) == \
        expected_records(queue, list(enumerate(picks_b)))


def test_overlap_share_and_one_labeler_never_gets_a_question_twice(tmp_path):
    with serving(new_queue(tmp_path / "labels.json", n=20, overlap=0.5)) as server:
        queue = server.queue
        overlapped = [i for i in range(20) if queue.overlapped(i)]
        assert 5 <= len(overlapped) <= 15 and queue.progress()["overlapped"] == len(overlapped)
        alone = Client(server.url)
        seen = []
        while (state := alone.state())["question"] is not None:
            seen.append(state["question"]["id"])
            alone.label(0)
        assert seen == list(range(20))  # each once; the overlapped ones now wait for a second labeler
        assert state["progress"]["complete"] == 20 - len(overlapped)
        second = Client(server.url)
        assert second.state()["question"]["id"] == overlapped[0]


def test_scalar_rating(tmp_path):
    out = tmp_path / "ratings.json"
    with serving(new_queue(out, "scalar_rating", n=4, overlap=1.0)) as server:
        a, b = Client(server.url), Client(server.url)
        state = a.state()
        assert state["kind"] == "rating" and state["labels"] == [1, 2, 3, 4, 5, 6, 7]
        assert len(state["question"]["responses"]) == 1
        for bad in (0, 8, 2.5, True, "7"):
            status, data = a.post("/api/label", {"id": 0, "label": bad})
            assert status == 400 and "label" in data["error"]
        for rating_a, rating_b in ((7, 7), (1, 2), (4, 6), (5, 5)):
            a.label(rating_a)
            b.label(rating_b)
        agreement = a.get("/api/agreement")
        # by hand: first ratings 7,1,4,5 and second 7,2,6,5 (a quarter each); equal by chance: (7,7), (5,5):
        # 2/16; within one by chance: (7,7) (7,6) (1,2) (4,5) (5,5) (5,6): 6/16
        assert {k: v for k, v in agreement.items() if k != "labelers"} == dict(
            doubly_labelled=4, agreed=2, rate=0.5, rule="same score", chance=0.125, kappa=pytest.approx(3 / 7),
            within_one_rate=0.75, within_one_chance=0.375, within_one_kappa=pytest.approx(0.6))
        assert [r["within_one_rate"] for r in agreement["labelers"]] == [0.75, 0.75]
        queue = server.queue
    records = json.loads(out.read_text())
    assert records[1] == {"query": queue.items[1].question.query, "sample": queue.items[1].question.responses[0],
                          "score": 1.0}
    labels = load_for_training(out, type_name="scalar_rating")
    assert labels.columns["score"].tolist() == [7.0, 1.0, 4.0, 5.0] and labels.columns["score"].dtype == np.float32
    second = load_for_training(out.with_name("ratings.json.overlap.json"), type_name="scalar_rating")
    assert second.columns["score"].tolist() == [7.0, 2.0, 6.0, 5.0]


def test_token_required_beyond_this_machine(tmp_path):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        web.check_bind(host, None)
    for host in ("0.0.0.0", "192.168.1.20", "::", "example.org"):
        with pytest.raises(UserError, match="--token"):
            web.check_bind(host, None)
        web.check_bind(host, "s3cret")
    with pytest.raises(UserError, match="letters, digits"):
        web.check_bind("0.0.0.0", "a b;c")
    with pytest.raises(UserError, match="--token"):
        web.LabelServer(new_queue(tmp_path / "x.json"), web.Page("t", "i"), "0.0.0.0", 0, None)
    assert cli.main("label", ["serve", "test", "--out", str(tmp_path / "y.json"), "--host", "0.0.0.0"]) == 1

    with serving(new_queue(tmp_path / "labels.json"), token="s3cret") as server:
        assert server.url.endswith("/?token=s3cret")
        stranger = Client(server.url)
        for path in ("/", "/api/state", "/static/app.js", "/api/agreement"):
            status, data = stranger.request("GET", path)
            assert status == 403 and "token" in data["error"]
        assert stranger.request("GET", "/api/state?token=wrong")[0] == 403
        assert stranger.request("GET", "/api/state", headers={"X-Token": "s3cret"})[0] == 200
        status, _ = stranger.post("/api/label", {"id": 0, "label": 0})
        assert status == 403
        friend = Client(server.url)
        request = urllib.request.Request(server.url)
        with friend.opener.open(request) as response:  # the page itself, then the cookie carries the token
            assert response.status == 200 and b"<!doctype html>" in response.read()
        assert friend.state()["question"]["id"] == 1  # 0 is with the stranger who sent X-Token
        assert friend.label(2)["progress"]["labelled"] == 1


def test_bad_requests_get_a_4xx_with_a_reason(tmp_path):
    with serving(new_queue(tmp_path / "labels.json")) as server:
        client = Client(server.url)
        qid = client.state()["question"]["id"]
        json_header = {"Content-Type": "application/json"}
        cases = [
            (client.request("POST", "/api/label", b"{not json", json_header), 400, "not JSON"),
            (client.request("POST", "/api/label", b"[1, 2]", json_header), 400, "JSON object"),
            (client.request("POST", "/api/label", b'{"id": 0, "label": 1}', {"Content-Type": "text/plain"}), 415,
             "application/json"),
            (client.request("POST", "/api/label", b"\xff\xfe", json_header), 400, "not JSON"),
            (client.request("POST", "/api/label", b"{}", {**json_header, "Content-Length": "100000"}), 413, "at most"),
            (client.post("/api/label", {"label": 1}), 400, "lacks 'id'"),
            (client.post("/api/label", {"id": qid}), 400, "lacks 'label'"),
            (client.post("/api/label", {"id": qid, "label": 4}), 400, "label 4"),
            (client.post("/api/label", {"id": qid, "label": None}), 400, "label None"),
            (client.post("/api/label", {"id": 99, "label": 1}), 400, "no question 99"),
            (client.post("/api/label", {"id": "0", "label": 1}), 400, "no question '0'"),
            (client.post("/api/label", {"id": qid + 1, "label": 1}), 409, "not the one"),
            (client.post("/api/skip", {}), 400, "lacks 'id'"),
            (client.post("/api/undo", {}), 409, "nothing to undo"),
            (client.request("GET", "/api/label"), 405, "use POST"),
            (client.request("POST", "/api/state", b"{}", json_header), 405, "use GET"),
            (client.request("DELETE", "/api/state"), 405, "use GET"),
            (client.request("GET", "/../../etc/passwd"), 404, "no page"),
            (client.request("GET", "/static/../app.py"), 404, "no page"),
        ]
        for (status, data), expected_status, reason in cases:
            assert status == expected_status and reason in data["error"], (status, data, reason)
        client.label(1)
        status, data = Client(server.url).post("/api/label", {"id": 0, "label": 1})  # a stranger, on a taken question
        assert status == 409
        assert client.state()["progress"]["labelled"] == 1


def test_page_is_escaped_and_locked_down(tmp_path):
    with serving(new_queue(tmp_path / "labels.json")) as server:
        with urllib.request.urlopen(server.url) as response:
            policy = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy and "unsafe-inline" not in policy
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert "lmhp_session=" in response.headers["Set-Cookie"]
        script = (web.STATIC / "app.js").read_text()
        assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "eval(" not in script


def test_human_labeler_answers_collects_questions(tmp_path):
    """The Labeler protocol through people: answer() blocks until they answered, then returns their labels."""
    hp, policy = policy_of("test")
    queue = LabelQueue(tmp_path / "labels.json", label_types.get("best_of_4"))
    asked = collect.ask(policy, hp.task, torch.zeros(3, hp.task.query_length, dtype=torch.long), 4,
                        torch.Generator().manual_seed(0), None)
    reports: list[str] = []
    result: list = []
    labeler = PeopleLabeler(queue, policy.encoding.padding_token, report=reports.append, poll_s=0.05)
    with serving(queue) as server:
        thread = threading.Thread(target=lambda: result.extend(labeler.answer(asked)))
        thread.start()
        client = Client(server.url)
        while client.state()["question"] is None:
            time.sleep(0.02)
        client.label(2)
        client.post("/api/skip", {"id": 1})
        client.label(0)
        thread.join(10)
        assert not thread.is_alive() and result == [2, None, 0]
        status, data = client.post("/api/undo", {})
        assert status == 409 and "trainer" in data["error"]
        assert reports and all(re.fullmatch(r"waiting for people: [0-2]/3 questions answered", r) for r in reports), reports
    assert queue.items[1].question == asked[1]


def test_collect_with_people_as_the_labeler(tmp_path):
    """collect() as with a mock labeler: skipped questions are replaced by new ones, asked of people."""
    hp, policy = policy_of("test")
    out = tmp_path / "labels.json"
    queue = LabelQueue(out, label_types.get("best_of_4"))
    labeler = PeopleLabeler(queue, policy.encoding.padding_token, report=None, poll_s=0.05)
    records: list[dict] = []
    with serving(queue) as server:
        thread = threading.Thread(target=lambda: records.extend(collect.collect(policy, hp.task, labeler, 2,
                                                                                chunk_size=8)))
        thread.start()
        client = Client(server.url)
        for answer in (2, None, 0, 1):  # 2 questions a batch: the skip makes collect ask a second batch
            while (state := client.state())["question"] is None:
                time.sleep(0.02)
            if answer is None:
                client.post("/api/skip", {"id": state["question"]["id"]})
            else:
                client.label(answer)
        thread.join(10)
        assert not thread.is_alive()
    written = json.loads(out.read_text())
    assert [r["best"] for r in written] == [2, 0, 1] and records == written[:2]


def test_a_label_file_not_made_by_the_app_is_not_overwritten(tmp_path):
    out = tmp_path / "labels.json"
    out.write_text("[]")
    with pytest.raises(UserError, match="not made by the labeling app"):
        LabelQueue(out, label_types.get("best_of_4"))
    with pytest.raises(UserError, match="overlap"):
        LabelQueue(tmp_path / "other.json", label_types.get("best_of_4"), overlap=1.5)


def test_serve_command_prints_the_url_and_stops_on_ctrl_c(tmp_path):
    out = tmp_path / "labels.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, str(ROOT / "label.py"), "serve", "test", "--out", str(out), "--n", "3",
                                "--port", "0", "--overlap", "0.5"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        lines = []
        while not (lines and lines[-1].startswith("open ")):
            line = process.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = lines[-1].split()[1]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
        client = Client(url)
        assert client.state()["instructions"] == "Pick the best continuation of the text."
        client.label(1)
        while not lines[-1].startswith("labelled 1/3 questions"):
            lines.append(process.stdout.readline())
            assert lines[-1], "".join(lines)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, rest
    assert "stopped: labelled 1/3 questions, skipped 0" in rest and "agreement of doubly-labelled" in rest
    assert "Traceback" not in rest
    assert len(json.loads(out.read_text())) == 1
    assert json.loads(out.with_name("labels.json.questions.json").read_text())["label_type"] == "best_of_4"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_that_fails_before_serving_leaves_nothing(tmp_path, monkeypatch, capsys):
    """No network for the policy: the command fails, and the new label file's files (and the folder
    made for them) are gone."""
    monkeypatch.setenv("LMHP_MIRROR", f"http://127.0.0.1:{_closed_port()}")  # refuses connections
    out = tmp_path / "labels" / "lab.json"
    assert cli.main("label", ["serve", "test", "--out", str(out), "--policy", "124M", "--port", "0"]) == 1
    assert "cannot connect" in capsys.readouterr().err
    assert _left_in(tmp_path) == []


def _left_in(folder: Path) -> list[str]:
    """What is in `folder` but the download cache."""
    return sorted(p.name for p in folder.iterdir() if p.name != "cache")


def test_a_busy_port_fails_before_sampling_and_keeps_an_earlier_start(tmp_path, capsys):
    out = tmp_path / "lab.json"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert cli.main("label", ["serve", "test", "--out", str(out), "--port", port]) == 1
        output = capsys.readouterr()
        assert "choose another --port" in output.err and "sampling" not in output.out
        assert _left_in(tmp_path) == []
        new_queue(out).close()  # an earlier start, with its questions: a failed restart keeps them
        assert cli.main("label", ["serve", "test", "--out", str(out), "--port", port]) == 1
    assert _left_in(tmp_path) == ["lab.json", "lab.json.questions.json", "lab.json.sqlite"]
    assert len(questions.load(out.with_name("lab.json.questions.json"))[1]) == 6


def test_serve_help_and_instructions(capsys):
    assert cli.main("label", ["serve", "--help"]) == 0
    assert "label.py serve EXPERIMENT --out FILE" in capsys.readouterr().out
    bo4, rating = label_types.get("best_of_4"), label_types.get("scalar_rating")
    assert web.instructions("mock_descriptiveness", "mock:descriptiveness:0.5", bo4).startswith(
        "Pick the most descriptive continuation")
    assert web.instructions("sentiment", "gs://x.json", rating).startswith("Rate the sentiment")
    assert web.instructions("test", "test", bo4) == "Pick the best continuation of the text."
    with pytest.raises(UserError, match="best_of_N or scalar_rating"):
        questions.count_responses(label_types.get("scalar_compare"))


def start_serve(tmp_path: Path, *args: str, ignore_sigint: bool = False) -> tuple[subprocess.Popen, str, list[str]]:
    """`label.py serve test` in a process of its own; (the process, its URL, its lines so far).
    The caller must kill it in a `finally` (a test that fails must not leave a server behind)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    process = subprocess.Popen([sys.executable, str(ROOT / "label.py"), "serve", "test", *args, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                               preexec_fn=preexec)
    lines: list[str] = []
    while not (lines and lines[-1].startswith("open ")):
        line = process.stdout.readline()
        if not line:
            process.kill()
            raise AssertionError("".join(lines))
        lines.append(line)
    return process, lines[-1].split()[1], lines


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_with_its_summary_when_started_with_sigint_ignored(tmp_path, signum):
    """As from a script's `&`: SIGINT ignored when it starts. Either signal stops it, with browsers
    connected (one idle connection, one request sent halfway), and prints the summary."""
    out = tmp_path / "labels.json"
    process, url, _ = start_serve(tmp_path, "--out", str(out), "--n", "3", ignore_sigint=True)
    try:
        Client(url).label(2)
        port = int(url.rsplit(":", 1)[1].strip("/"))
        idle, halfway = socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port))
        halfway.sendall(b"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.2)  # both connections are with handler threads now
        process.send_signal(signum)
        rest, _ = process.communicate(timeout=30)
        idle.close()
        halfway.close()
    finally:
        process.kill()
    assert process.returncode == 0, rest
    assert "stopped: labelled 1/3 questions, skipped 0" in rest and "Traceback" not in rest, rest
    assert len(json.loads(out.read_text())) == 1


def test_requests_for_other_hosts_are_refused(tmp_path):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 gets nothing."""
    with serving(new_queue(tmp_path / "labels.json")) as server:
        port = server.server_address[1]
        client = Client(server.url)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}"):
            assert client.request("GET", "/api/state", headers={"Host": host})[0] == 200
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1", f"[::1]:{port}",
                     f"localhost.evil.example:{port}", ""):
            for method, path in (("GET", "/"), ("GET", "/api/state"), ("GET", "/api/agreement"), ("POST", "/api/undo")):
                status, data = client.request(method, path, b"{}" if method == "POST" else None,
                                              {"Host": host, "Content-Type": "application/json"})
                assert status == 403 and "this machine only" in data["error"], (host, path, status, data)
        assert server.queue.progress()["labelled"] == 0
    with serving(new_queue(tmp_path / "open.json"), token="s3cret") as server:  # on loopback the check stays
        assert Client(server.url).request("GET", "/api/state?token=s3cret", headers={"Host": "evil.example"})[0] == 403
    queue = new_queue(tmp_path / "other.json")
    server = web.LabelServer(queue, web.Page("t", "i"), "0.0.0.0", 0, "s3cret")  # opened to other hosts
    server.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert Client(url).request("GET", "/api/state?token=s3cret", headers={"Host": "labels.example.org"})[0] == 200
        assert Client(url).request("GET", "/api/state", headers={"Host": "labels.example.org"})[0] == 403
    finally:
        server.shutdown()
        server.server_close()
        queue.close()


def test_an_earlier_versions_journal_is_migrated_once(tmp_path):
    """FILE.questions.json and FILE.journal.jsonl of the earlier app (its last line cut short by a
    crash) move into FILE.sqlite: the same answers, undos and labellers; the journal is renamed."""
    out = tmp_path / "labels.json"
    hp, policy = policy_of("test")
    items = questions.prepare(policy, hp.task, 5, 4, 0, None)
    label_type = label_types.get("best_of_4")
    questions.save(out.with_name("labels.json.questions.json"), label_type, items)
    a, b = "a" * 32, "b" * 32
    events = [dict(seq=0, event="answer", id=0, session=a, label=1, time=1.0),
              dict(seq=1, event="answer", id=1, session=b, label=None, time=2.0),
              dict(seq=2, event="answer", id=2, session=a, label=3, time=3.0),
              dict(seq=3, event="undo", undo=2, session=a, time=4.0),
              dict(seq=4, event="answer", id=3, session=b, label=2, time=5.0)]
    journal = out.with_name("labels.json.journal.jsonl")
    journal.write_text("".join(json.dumps(e) + "\n" for e in events) + '{"seq": 5, "event": "ans')
    out.write_text("[]")  # as the earlier app left it (any content: it is written again)

    queue = LabelQueue(out, label_type)
    assert not journal.exists() and journal.with_name(journal.name + ".migrated").exists()
    assert list(queue.items) == items
    assert queue.progress() == dict(questions=5, labelled=2, skipped=1, complete=3, overlapped=0)
    assert queue.next_question(a) == 2  # its undone question again
    queue.close()
    assert json.loads(out.read_text()) == expected_records(queue, [(0, 1), (3, 2)])
    assert stored_events(out) == [("answer", 0), ("answer", 1), ("answer", 2), ("undo", None), ("answer", 3)]

    journal.with_name(journal.name + ".migrated").rename(journal)  # as a crash between migrating and renaming
    again = LabelQueue(out, label_type)
    assert again.progress()["labelled"] == 2 and len(stored_events(out)) == 5 and not journal.exists()
    again.close()
    other = tmp_path / "other.json"
    LabelQueue(other, label_type).close()
    other.with_name("other.json.journal.jsonl").write_text(json.dumps(events[0]) + "\n")
    with pytest.raises(UserError, match="event 0 cannot be replayed .no question 0"):
        LabelQueue(other, label_type)  # a journal without its questions
    assert stored_events(other) == [] and other.with_name("other.json.journal.jsonl").exists()  # rolled back
    with pytest.raises(UserError, match="both hold answers"):
        with sqlite3.connect(out.with_name("labels.json.sqlite")) as db:
            db.execute("DELETE FROM meta WHERE key = 'migrated'")
        out.with_name("labels.json.journal.jsonl").write_text(json.dumps(events[0]) + "\n")
        LabelQueue(out, label_type)
    bad = tmp_path / "bad.json"
    bad.with_name("bad.json.journal.jsonl").write_text('{"seq": 0, "event": "answer", "id": "0", "session": "x"}\n')
    with pytest.raises(UserError, match="line 1 lacks 'id'"):
        LabelQueue(bad, label_type)


def test_counters_kept_as_answers_come_equal_a_recount(tmp_path):
    """Random labels, skips and undos by three labelers on overlapping questions: the progress and
    agreement the queue keeps equal those recounted from its answers."""
    import random

    queue = new_queue(tmp_path / "labels.json", n=30, overlap=0.5)
    rng = random.Random(0)
    sessions = [f"{i:032x}" for i in range(3)]
    try:
        for _ in range(150):
            session = rng.choice(sessions)
            qid = queue.next_question(session)
            if rng.random() < 0.2 and queue.can_undo(session):
                queue.undo(session)
            elif qid is not None:
                queue.skip(session, qid) if rng.random() < 0.2 else queue.label(session, qid, rng.randrange(4))
            answers = {i: queue.assignment.answers.get(i, []) for i in range(30)}
            labels = {i: [a.label for a in answers[i] if a.label is not None] for i in range(30)}
            complete = [i for i in range(30) if len(answers[i]) >= (2 if queue.overlapped(i) else 1)]
            assert queue.progress() == dict(questions=30, labelled=sum(bool(ls) for ls in labels.values()),
                                            skipped=sum(not labels[i] for i in complete), complete=len(complete),
                                            overlapped=sum(queue.overlapped(i) for i in range(30)))
            pairs = [ls[:2] for ls in labels.values() if len(ls) > 1]
            agreement = queue.agreement()
            assert agreement["doubly_labelled"] == len(pairs) and agreement["agreed"] == sum(x == y for x, y in pairs)
            assert sum(r["labelled"] for r in agreement["labelers"]) == sum(map(len, labels.values()))
        assert agreement["doubly_labelled"] > 3
    finally:
        queue.close()
    firsts = [(i, ls[0]) for i, ls in sorted(labels.items(), key=lambda kv: kv[0]) if ls]
    assert sorted((r["query"], r["best"]) for r in json.loads(queue.out.read_text())) == \
        sorted((queue.items[i].question.query, label) for i, label in firsts)
