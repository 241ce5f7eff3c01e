"""`label.py serve`: the labeling app's command line — prepare the questions, serve the page,
print progress until Ctrl-C or SIGTERM.

The command installs its own handlers of SIGINT and SIGTERM (so it also stops when started
with SIGINT ignored, as `&` in a script does): either stops the server, writes the label files
and prints the summary, however many browsers are connected.
"""

import signal
import threading
from pathlib import Path

from lm_human_preferences import experiments
from lm_human_preferences.cli import options
from lm_human_preferences.labeling import label_types
from lm_human_preferences.labeling.app import questions, web
from lm_human_preferences.labeling.app.queue import LabelQueue
from lm_human_preferences.task.policy import load_policy
from lm_human_preferences.utils import distributed
from lm_human_preferences.utils.errors import UserError

SERVE_HELP = """\
usage: label.py serve EXPERIMENT --out FILE [--n N] [--type best_of_4|scalar_rating] [--policy MODEL]
                      [--questions FILE] [--port P] [--host H --token T] [--overlap F] [--seed S]
                      [--instructions TEXT] [--<task.hparam> VALUE ...]

Serve a web page on which people label the policy's samples. The train_reward EXPERIMENT
gives the task and the label type. Every answer is in FILE.sqlite before it is confirmed;
FILE gets the labels in the released schema within seconds and at the stop, FILE.questions.json
the questions, so a restart with the same --out goes on where it stopped (an earlier version's
FILE.journal.jsonl is migrated). A first start that fails before it serves (no network for the
policy, a busy port) leaves no file behind. Ctrl-C (or SIGTERM) stops.

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


STOP_POLL_S = 0.25  # how often the progress loop looks for a stop request


def progress_line(queue: LabelQueue) -> str:
    p, a = queue.progress(), queue.agreement()
    line = f"labelled {p['labelled']}/{p['questions']} questions, skipped {p['skipped']}"
    if p["overlapped"]:
        line += f"; agreement {agreement_text(a)}"
    return line


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def agreement_text(a: dict) -> str:
    if not a["doubly_labelled"]:
        return "none yet (no question labelled twice)"
    text = (f"{a['rate']:.2f} ({a['agreed']}/{a['doubly_labelled']} {a['rule']}; chance {_number(a['chance'])}, "
            f"kappa {_number(a['kappa'])}")
    if "within_one_rate" in a:
        text += f"; within one point {a['within_one_rate']:.2f}, kappa {_number(a['within_one_kappa'])}"
    return text + ")"


def labelers_text(a: dict) -> str:
    """Each labeler's counts and agreement with the other labeler of their doubly-labelled questions."""
    rows = []
    for r in a["labelers"]:
        row = f"labeler {r['labeler']}: {r['labelled']} labelled, {r['skipped']} skipped"
        if r["doubly_labelled"]:
            row += f", agreed on {r['agreed']}/{r['doubly_labelled']} ({r['rate']:.2f})"
        rows.append(row)
    return "; ".join(rows)


def _fill(queue: LabelQueue, hp, given: str | None, policy_name: str | None, n: int, seed: int) -> None:
    """Give an empty queue its questions: from the file `given`, else sampled from the policy."""
    n_responses = questions.count_responses(queue.label_type)
    if queue.items:
        print(f"{len(queue.items)} questions and the answers so far from {queue.paths['sqlite']}")
        items = questions.load(Path(given))[1] if given else None
        if items is not None and items != queue.items:
            raise UserError(f"--questions {given} differs from the questions in {queue.paths['sqlite']}, which "
                            "this label file was started with; choose another --out")
        return
    if given:
        type_name, items = questions.load(Path(given))
        if type_name != queue.label_type.name:
            raise UserError(f"{given} holds {type_name} questions; serve them with --type {type_name}")
        questions.check(items, n_responses, hp.task.query_length, hp.task.response_length, given)
    else:
        policy_name = policy_name or hp.task.policy.initial_model
        print(f"sampling {n} queries × {n_responses} responses from {policy_name} …", flush=True)
        policy = load_policy(policy_name, hp.task, distributed.device())
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
    flags = options.parse(args[1:], booleans=set())
    if "out" not in flags:
        raise UserError("label.py serve needs --out FILE")
    out = Path(flags.pop("out"))
    n = options.pop_int(flags, "n", 100, minimum=1)
    seed = options.pop_int(flags, "seed", 0)
    port = options.pop_int(flags, "port", web.DEFAULT_PORT, minimum=0)
    overlap = options.pop_float(flags, "overlap", 0.0, positive=False)
    host, token = flags.pop("host", "127.0.0.1"), flags.pop("token", None)
    label_type = label_types.get(flags.pop("type", hp.labels.type))
    questions.count_responses(label_type)
    text = flags.pop("instructions", None) or web.instructions(experiment, hp.labels.source, label_type)
    given, policy_name = flags.pop("questions", None), flags.pop("policy", None)
    web.check_bind(host, token)
    for key, value in flags.items():
        if not key.startswith("task."):
            raise UserError(f"unknown option --{key} (see label.py serve --help)")
        hp.override_from_str(key, value)
    hp.task.validate("task.")

    stop = _Stop()
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _serve(LabelQueue(out, label_type, overlap, seed), hp, (given, policy_name, n, seed),
               web.Page(f"{experiment}: {label_type.name}", text), (host, port, token), stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Stop(threading.Event):
    """Set by SIGINT or SIGTERM once the server runs; before (while sampling), they interrupt."""

    serving = False

    def handle(self, signum, frame) -> None:
        if not self.serving:
            raise KeyboardInterrupt
        self.set()


def _serve(queue: LabelQueue, hp, fill: tuple, page: web.Page, bind: tuple, stop: _Stop) -> None:
    """Fill the queue, serve it until `stop` is set, then close everything and print the summary.

    The port is taken before the questions are sampled, so a busy one fails at once. A failure
    before serving (a policy that cannot be downloaded, a busy port, Ctrl-C while sampling)
    leaves no file of a new label file behind (`LabelQueue.discard`)."""
    server = None
    try:
        server = web.LabelServer(queue, page, *bind)
        _fill(queue, hp, *fill)
    except BaseException:
        if server is not None:
            server.server_close()
        queue.discard()
        raise
    stop.serving = True
    try:
        server.start()
        try:
            print(f"labeling app for {page.title} → {queue.out}\nopen {server.url}\nCtrl-C stops", flush=True)
            _report_progress(queue, stop)
        finally:
            server.shutdown()
            server.server_close()
    finally:
        queue.close()
    print(f"\nstopped: {progress_line(queue)}; labels in {queue.out}", flush=True)
    if queue.overlap > 0:
        agreement = queue.agreement()
        print(f"agreement of doubly-labelled questions: {agreement_text(agreement)}; second labels in "
              f"{queue.paths['overlap.json']}")
        print(f"per labeler: {labelers_text(agreement)}", flush=True)


def _report_progress(queue: LabelQueue, stop: threading.Event) -> None:
    """Print a line whenever the progress changes, until `stop` is set."""
    version, last = -1, ""
    while not stop.is_set():
        version = queue.wait_for_change(version, timeout=STOP_POLL_S)
        line = progress_line(queue)
        if line != last:
            print(line, flush=True)
            last = line
