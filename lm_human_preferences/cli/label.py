"""`label.py EXPERIMENT --out FILE ...`: a label file judged by a mock labeler; `label.py serve ...`: people label;
`label.py export ...` / `label.py import ...`: label files to and from text preference pairs."""

from pathlib import Path

from lm_human_preferences import experiments
from lm_human_preferences.cli import options, pairs, serve
from lm_human_preferences.labeling import collect, label_files, mock_labelers, sources
from lm_human_preferences.task.policy import load_policy
from lm_human_preferences.utils import distributed
from lm_human_preferences.utils.errors import UserError

LABEL_HELP = """\
usage: label.py EXPERIMENT --out FILE [--n N] [--labeler NAME] [--noise X] [--policy MODEL] [--seed S]
                [--<task.hparam> VALUE ...]

Sample N queries × 4 responses from a policy and write a label file in the released schema
(a JSON list of {"query", "sample0".."sample3", "best"}), judged by a mock labeler. The
train_reward EXPERIMENT gives the task (dataset, lengths, truncation, initial model) and,
for the mock experiments, the labeler.

options:
  --out FILE       where to write the labels
  --n N            number of labelled queries (default 1000)
  --labeler NAME   sentiment or descriptiveness (default: the experiment's mock labeler)
  --noise X        Boltzmann noise of the labeler's choice; 0 always picks the best (default 0)
  --policy MODEL   the policy that answers: a model name or save folder (default: task.policy.initial_model)
  --seed S         random seed (default 0)

usage: label.py serve EXPERIMENT --out FILE [--flags]
People label instead, on a local web page (label.py serve --help).

usage: label.py export LABELS --experiment E --out FILE.jsonl [--keep-ids]
usage: label.py import PAIRS.jsonl --experiment E --out FILE.json
Label files to and from the {"prompt", "chosen", "rejected"} text pairs of TRL, OpenRLHF and
Hugging Face datasets (label.py export --help, label.py import --help).
"""

def label_command(args: list[str]) -> None:
    subcommands = {"serve": serve.serve_command, "export": pairs.export_command, "import": pairs.import_command}
    if args and args[0] in subcommands:
        return subcommands[args[0]](args[1:])
    if not args or "--help" in args or "-h" in args:
        print(LABEL_HELP)
        return
    if args[0].startswith("--"):
        raise UserError("usage: label.py EXPERIMENT --out FILE [--flags] (see --help)")
    hp = experiments.get("train_reward", args[0])
    flags = options.parse(args[1:], booleans=set())
    if "out" not in flags:
        raise UserError("label needs --out FILE")
    out = Path(flags.pop("out"))
    n = options.pop_int(flags, "n", 1000, minimum=1)
    seed = options.pop_int(flags, "seed", 0)
    source = hp.labels.source if sources.is_mock(hp.labels.source) else None
    labeler = flags.pop("labeler", None) or (mock_labelers.parse_source(source)[0] if source else None)
    if labeler is None:
        raise UserError(f"experiment {args[0]!r} has no mock labeler; choose one with --labeler")
    noise = options.pop_float(flags, "noise", 0.0, positive=False)
    policy_name = flags.pop("policy", None)
    for key, value in flags.items():
        if not key.startswith("task."):
            raise UserError(f"unknown option --{key} (see --help)")
        hp.override_from_str(key, value)
    policy_name = policy_name or hp.task.policy.initial_model  # after --task.policy.initial_model, if given
    hp.task.validate("task.")
    if policy_name != hp.task.policy.initial_model:  # the answering policy's context must fit the task too
        hp.task.policy.initial_model = policy_name
        hp.task.validate("task.")
    device = distributed.device()
    policy = load_policy(policy_name, hp.task, device)
    records = collect.collect(policy, hp.task, collect.MockLabeler(labeler, noise, seed), n, seed=seed,
                              chunk_size=hp.run.chunk_size)
    label_files.write(records, out)
    print(f"wrote {len(records)} {labeler} labels to {out}")
