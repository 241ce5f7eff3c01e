#!/usr/bin/env python3
"""The labeling app under load: labelers answering over HTTP against a queue that already holds
K answered questions of the summarization tasks' size.

    python bench/label_app_load.py                          # K = 1k, 10k, 50k; 20 labelers
    python bench/label_app_load.py --k 1000 2000 --max-seconds 30
    PYTHONPATH=/tmp/wt-old python bench/label_app_load.py --k 1000   # another checkout's code

For each K a fresh folder gets a questions file of K + `--answers` best-of-4 questions (queries
of 500 tokens, 4 responses of 75, texts of matching length) and a journal of K answers, the
files an earlier `label.py serve` would have left; the queue opens them (timed: "open s"; an
app that keeps a database migrates them into it, once, and writes the label file) and the app
serves them on 127.0.0.1. A second process runs `--labelers` threads, each a browser
session: GET /api/state for its question, then POST /api/label, as fast as the server answers
(plus `--think-ms` between answers), until `--answers` answers in all or `--max-seconds`. The
latency per answer is the POST's round trip; answers/s is answers over the measured time;
"failed" counts POSTs whose connection broke (the labeler then reloads its question). The
queue is then closed (timed: "close s", which writes the label file) and opened again ("reopen s":
a restart's cost). Prints one row per K.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after PYTHONPATH and the installed package: PYTHONPATH picks the code measured

from lm_human_preferences.labeling import collect, label_types  # noqa: E402
from lm_human_preferences.labeling.app import questions, web  # noqa: E402
from lm_human_preferences.labeling.app.queue import LabelQueue  # noqa: E402

QUERY_TOKENS, RESPONSE_TOKENS, RESPONSES = 500, 75, 4
CHARS_PER_TOKEN = 4.5


def make_items(n: int, seed: int) -> list[questions.Item]:
    """`n` distinct questions of summarization size (token ids drawn from a shared pool of ints)."""
    rng = random.Random(seed)
    pool = list(range(256, 50257, 7))
    words = " ".join(rng.choice(["the", "a", "report", "said", "that", "people", "were", "going", "to", "summary"])
                     for _ in range(20000))
    items = []
    for i in range(n):
        query = [i % 50257] + rng.choices(pool, k=QUERY_TOKENS - 1)
        responses = [rng.choices(pool, k=RESPONSE_TOKENS) for _ in range(RESPONSES)]
        at = rng.randrange(len(words) // 2)
        query_text = words[at:at + int(QUERY_TOKENS * CHARS_PER_TOKEN)]
        texts = [words[at + k:at + k + int(RESPONSE_TOKENS * CHARS_PER_TOKEN)] for k in range(RESPONSES)]
        items.append(questions.Item(collect.Question(query, responses, query_text, texts), [False] * RESPONSES))
    return items


def prefill(out: Path, k: int, extra: int) -> None:
    """The files a `label.py serve` run with K answers leaves: questions and journal."""
    label_type = label_types.get("best_of_4")
    questions.save(out.with_name(out.name + ".questions.json"), label_type, make_items(k + extra, seed=k))
    rng = random.Random(0)
    sessions = [f"{s:032x}" for s in range(20)]
    with open(out.with_name(out.name + ".journal.jsonl"), "w", encoding="utf-8") as journal:
        for seq in range(k):
            journal.write(json.dumps(dict(seq=seq, event="answer", id=seq, session=sessions[seq % 20],
                                          label=rng.randrange(RESPONSES), time=0.0)) + "\n")


def _request(port: int, method: str, path: str, cookie: str | None, body: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Cookie": cookie} if cookie else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    connection.request(method, path, data, headers)
    response = connection.getresponse()
    payload = json.loads(response.read())
    set_cookie = response.getheader("Set-Cookie")
    connection.close()
    return response.status, payload, set_cookie


def labeler(port: int, budget: list, deadline: float, think_s: float, lock: threading.Lock, out: list,
            errors: list) -> None:
    """One browser session answering until the budget or the deadline runs out."""
    status, state, set_cookie = _request(port, "GET", "/api/state", None)
    cookie = set_cookie.split(";")[0]
    rng = random.Random(cookie)
    while time.monotonic() < deadline and state["question"] is not None:
        with lock:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        start = time.perf_counter()
        try:
            status, answered, _ = _request(port, "POST", "/api/label", cookie,
                                           {"id": state["question"]["id"], "label": rng.randrange(RESPONSES)})
        except OSError:  # counted, and the labeler goes on as a browser would (the old code reset some)
            errors.append(time.perf_counter() - start)
            status, state, _ = _request(port, "GET", "/api/state", cookie)
            continue
        elapsed = time.perf_counter() - start
        if status != 200:
            raise RuntimeError(f"answer refused: {status} {answered}")
        state = answered
        out.append(elapsed)
        if think_s:
            time.sleep(rng.uniform(0, 2 * think_s))


def clients(port: int, n: int, answers: int, max_seconds: float, think_s: float, result) -> None:
    """The labelers, in a process of their own (so their Python does not share the server's GIL)."""
    latencies: list[float] = []
    errors: list[float] = []
    budget, lock = [answers], threading.Lock()
    start = time.monotonic()
    threads = [threading.Thread(target=labeler, args=(port, budget, start + max_seconds, think_s, lock, latencies,
                                                      errors)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.put((latencies, len(errors), time.monotonic() - start))


def run(k: int, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="label_load_") as folder:
        out = Path(folder) / "labels.json"
        prefill(out, k, args.answers + args.labelers)
        os.sync()  # the set-up's writes (hundreds of MB at 50k) must not be flushed during the measurement
        start = time.perf_counter()
        queue = LabelQueue(out, label_types.get("best_of_4"), seed=0)
        while hasattr(queue, "store") and not out.exists():  # an app with a database writes the label file
            time.sleep(0.01)  # in the background, at once: its first write
        opened = time.perf_counter() - start
        os.sync()  # nor those of a migration: the measurement is of an app that runs, not of one starting
        server = web.LabelServer(queue, web.Page("load", "Pick the best."), "127.0.0.1", 0)
        server.start()
        try:
            context = multiprocessing.get_context("spawn")
            result = context.Queue()
            process = context.Process(target=clients, args=(server.server_address[1], args.labelers, args.answers,
                                                             args.max_seconds, args.think_ms / 1000, result))
            process.start()
            latencies, errors, elapsed = result.get(timeout=args.max_seconds + 300)
            process.join(30)
        finally:
            server.shutdown()
            server.server_close()
            start = time.perf_counter()
            queue.close()
            closed = time.perf_counter() - start
        start = time.perf_counter()
        LabelQueue(out, label_types.get("best_of_4"), seed=0).close()
        reopened = time.perf_counter() - start
    latencies.sort()
    return dict(k=k, answers=len(latencies), errors=errors, p50=1000 * statistics.median(latencies),
                p99=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                rate=len(latencies) / elapsed, open=opened, close=closed, reopen=reopened)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1000, 10000, 50000], help="answered questions before")
    parser.add_argument("--labelers", type=int, default=20)
    parser.add_argument("--answers", type=int, default=2000, help="answers measured per K (a bound)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time measured per K (a bound)")
    parser.add_argument("--think-ms", type=float, default=0.0, help="mean pause of a labeler between answers")
    parser.add_argument("--out", type=Path, help="also write the results with their provenance to this JSON file "
                                                 "(bench/common.py: write_results)")
    args = parser.parse_args()
    import lm_human_preferences

    print(f"code: {Path(lm_human_preferences.__file__).parent}; {args.labelers} labelers, think "
          f"{args.think_ms:g} ms; query {QUERY_TOKENS} tokens, {RESPONSES} responses of {RESPONSE_TOKENS}", flush=True)
    print("| K answered before | answers | failed | p50 ms | p99 ms | answers/s | open s | close s | reopen s |\n"
          "|---|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for k in args.k:
        r = run(k, args)
        results.append(r)
        print(f"| {r['k']:,} | {r['answers']} | {r['errors']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['rate']:.1f} | "
              f"{r['open']:.1f} | {r['close']:.1f} | {r['reopen']:.1f} |", flush=True)
    if args.out:  # imported here: bench/common imports this tree's package, which PYTHONPATH may not measure
        import common
        common.write_results(args.out, "label_app_load", dict(labelers=args.labelers, think_ms=args.think_ms,
                                                              code=str(Path(lm_human_preferences.__file__).parent),
                                                              runs=results))


if __name__ == "__main__":
    main()
