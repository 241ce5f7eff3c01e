"""`label.py serve`: the labeling app's command line — prepare the questions, serve the page,
print progress until Ctrl-C."""

from pathlib import Path

from lm_human_preferences import experiments
from lm_human_preferences.cli import options
from lm_human_preferences.labeling import label_types
from lm_human_preferences.labeling.app import questions, web
from lm_human_preferences.labeling.app.queue import LabelQueue
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.task.policy import Policy
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

    queue = LabelQueue(out, label_type, overlap, seed)
    try:
        _fill(queue, hp, given, policy_name, n, seed)
        server = web.LabelServer(queue, web.Page(f"{experiment}: {label_type.name}", text), host, port, token)
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
