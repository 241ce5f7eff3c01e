"""The labeling app killed with SIGKILL in the middle of a burst of concurrent answers: after a
restart, every answer a client saw confirmed is in the label file exactly once, and nothing else
but answers that were in flight when it died."""

import http.client
import json
import signal
import threading
import urllib.error
from collections import Counter

from lm_human_preferences.labeling import collect, label_types
from lm_human_preferences.labeling.app import questions

from test_label_app import Client, start_serve

LABELERS = 8
KILL_AFTER = 40  # confirmed answers


def burst(url: str, stop: threading.Event, confirmed: list, in_flight: list, refused: list) -> None:
    """One labeler answering as fast as the server confirms, until the server dies."""
    client = Client(url)
    try:
        state = client.state()
    except (urllib.error.URLError, ConnectionError, OSError):
        return
    n = 0
    while state["question"] is not None and not stop.is_set():
        answer = (state["question"]["id"], n % 4)
        n += 1
        try:
            status, data = client.post("/api/label", {"id": answer[0], "label": answer[1]})
        # killed mid-reply: no reply, a cut one (IncompleteRead, BadStatusLine) or a truncated body (ValueError)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
            in_flight.append(answer)  # sent, but no whole answer came: the server may or may not have it
            return
        (confirmed if status == 200 else refused).append(answer)
        if status != 200:
            return
        state = data


def prepared(tmp_path, n: int):
    """`n` questions of the test task's lengths (query 2 tokens, responses 3), without sampling."""
    path = tmp_path / "prepared.json"
    items = [questions.Item(collect.Question([i % 7, i // 7], [[i % 5, k, 1] for k in range(4)], f"query {i}",
                                             [f"response {k}" for k in range(4)]), [False] * 4) for i in range(n)]
    questions.save(path, label_types.get("best_of_4"), items)
    return path


def test_sigkill_in_a_burst_loses_and_doubles_nothing(tmp_path):
    out = tmp_path / "labels.json"
    process, url, _ = start_serve(tmp_path, "--out", str(out), "--questions", str(prepared(tmp_path, 400)))
    confirmed: list = []
    in_flight: list = []
    refused: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=burst, args=(url, stop, confirmed, in_flight, refused))
               for _ in range(LABELERS)]
    try:
        for t in threads:
            t.start()
        while len(confirmed) < KILL_AFTER and any(t.is_alive() for t in threads):
            threading.Event().wait(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        process.kill()
    assert len(confirmed) >= KILL_AFTER and refused == [], (len(confirmed), refused)

    process, url, _ = start_serve(tmp_path, "--out", str(out))  # the restart writes the label file again
    try:
        restarted = Client(url).state()
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, rest
    _, items = questions.load(out.with_name("labels.json.questions.json"))
    written = Counter(json.dumps(r, sort_keys=True) for r in json.loads(out.read_text()))
    as_record = {answer: json.dumps(collect.record(items[answer[0]].question, answer[1]), sort_keys=True)
                 for answer in confirmed + in_flight}
    assert max(written.values()) == 1  # nothing doubled
    missing = [a for a in confirmed if as_record[a] not in written]
    assert missing == []  # nothing confirmed lost
    unexplained = set(written) - {as_record[a] for a in confirmed + in_flight}
    assert unexplained == set()  # nothing that was not sent
    assert restarted["progress"]["labelled"] == len(written) and restarted["question"]["id"] not in \
        {qid for qid, _ in confirmed}
    print(f"SIGKILL after {len(confirmed)} confirmed answers from {LABELERS} labelers; {len(in_flight)} in flight, "
          f"of which {len(written) - len(confirmed)} had been recorded")
