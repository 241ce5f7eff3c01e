"""`label.py export ...` and `label.py import ...`: label files to and from the text preference
pairs that TRL, OpenRLHF and Hugging Face `datasets` read."""

from pathlib import Path

from lm_human_preferences import experiments
from lm_human_preferences.cli import options
from lm_human_preferences.labeling import interchange, label_files, label_types
from lm_human_preferences.language import encodings, trained_models
from lm_human_preferences.language.encodings import Encoding
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.utils import storage
from lm_human_preferences.utils.errors import UserError
from lm_human_preferences.utils.jsonstream import json_list_items

EXPORT_HELP = """\
usage: label.py export LABELS --experiment E --out FILE.jsonl [--type T] [--keep-ids]
                       [--<task.hparam> VALUE ...]

Write a label file (a path, https:// or gs:// URL: the released labels, or any file this port
writes) as JSON Lines of text, decoded with the encoding of train_reward experiment E, for
TRL, OpenRLHF or datasets.load_dataset("json", data_files="FILE.jsonl"):
  best_of_N       N - 1 {"prompt", "chosen", "rejected"} a record: the best response against each other one
  scalar_compare  one {"prompt", "chosen", "rejected"} by the sign of its difference (sample1 is chosen
                  when it is positive); records with difference 0 prefer neither, and are counted and left out
  scalar_rating   {"prompt", "completion", "score"}
The prompt is the query as the model reads it (task.query_prefix + query + task.query_suffix);
padding is dropped.

options:
  --experiment E   the train_reward experiment the labels were made for (its task's lengths and encoding)
  --out FILE       the JSON Lines file to write
  --type T         best_of_N, scalar_compare or scalar_rating (default: from the first record's keys)
  --keep-ids       also write the token ids, trailing padding removed: prompt_ids (the query, without
                   the task's prefix and suffix), chosen_ids and rejected_ids (or completion_ids)
"""

IMPORT_HELP = """\
usage: label.py import PAIRS.jsonl --experiment E --out FILE.json [--seed S] [--<task.hparam> VALUE ...]

Turn text preference pairs into a best_of_2 label file in the released schema ({"query",
"sample0", "sample1", "best"}), tokenized as the task of train_reward experiment E formats
queries and responses: each text encoded alone with the experiment's encoding and right-padded
with its padding token to task.query_length / task.response_length. Each line of PAIRS.jsonl is
  {"prompt": ..., "chosen": ..., "rejected": ...}   the responses without the prompt, or
  {"chosen": ..., "rejected": ...}                  both starting with their prompt: it is their longest
                                                    common prefix, cut back to the last place where both
                                                    texts have a whitespace character (which starts the responses)
The task's query_prefix and query_suffix are removed from a prompt that has them (the task adds
them itself). Lines written by `label.py export --keep-ids` are imported by their token ids.
Pairs the task could not have produced are skipped and counted by reason, never cut to fit: an
empty prompt or response, a prompt longer than task.query_length or a response longer than
task.response_length, a response that goes on after the task's truncate token, or two responses
with the same tokens. Which of sample0/sample1 holds the chosen response is drawn per record.

options:
  --experiment E   the train_reward experiment to train on the labels (its task's lengths and encoding)
  --out FILE       the label file to write
  --seed S         seed of the sample order (default 0)

Train with the same experiment and task options:
  ./launch.py train_reward E NAME --labels.source FILE.json --labels.type best_of_2 --labels.num_train N
"""


def _command_parts(args: list[str], usage: str, booleans: set[str]) -> tuple[str, dict[str, str]]:
    """(the input file, the other flags) of `export`/`import` arguments."""
    if not args or args[0].startswith("--"):
        raise UserError(f"usage: {usage} (see --help)")
    flags = options.parse(args[1:], booleans=booleans)
    for key in ("experiment", "out"):
        if key not in flags:
            raise UserError(f"usage: {usage}: --{key} is missing (see --help)")
    return args[0], flags


def _task_and_encoding(flags: dict[str, str]) -> tuple[lm_tasks.TaskHParams, Encoding]:
    """The experiment's task with the --task.* overrides of `flags` (which are popped), and its encoding;
    any other flag left is an error."""
    hp = experiments.get("train_reward", flags.pop("experiment"))
    for key, value in list(flags.items()):
        if not key.startswith("task."):
            raise UserError(f"unknown option --{key} (see --help)")
        hp.override_from_str(key, flags.pop(key))
    hp.task.validate("task.")
    _, encoding_name = trained_models.context_and_encoding(hp.task.policy.initial_model)
    return hp.task, encodings.get(encoding_name)


def _first_record(source: str) -> dict:
    text = storage.fetch(source).read_text(encoding="utf-8", errors="replace")
    first = next(iter(json_list_items(text, source)), None)
    if not isinstance(first, dict):
        raise UserError(f"{source}: not a label file (a JSON list of records)")
    return first


def export_command(args: list[str]) -> None:
    if "--help" in args or "-h" in args:
        print(EXPORT_HELP)
        return
    source, flags = _command_parts(args, "label.py export LABELS --experiment E --out FILE.jsonl", {"keep-ids"})
    out = Path(flags.pop("out"))
    keep_ids = options.pop_bool(flags, "keep-ids")
    type_name = flags.pop("type", None)
    task, encoding = _task_and_encoding(flags)
    label_type = label_types.get(type_name or interchange.detect_type(_first_record(source), source))
    vocab = label_files.Vocabulary(encoding.n_vocab, encoding.padding_token)
    labels = label_files.load(source, label_type, task.query_length, task.response_length, vocab)
    exported = interchange.export_records(labels, label_type, task, encoding, keep_ids)
    storage.atomic_write_text(out, interchange.jsonl(exported.records))
    kind = "ratings" if isinstance(label_type, label_types.ScalarRating) else "pairs"
    print(f"wrote {len(exported.records)} {kind} from {len(labels)} {label_type.name} records to {out}")
    if exported.ties:
        print(f"left out {exported.ties} records with difference 0 (they prefer neither response)")


def import_command(args: list[str]) -> None:
    if "--help" in args or "-h" in args:
        print(IMPORT_HELP)
        return
    source, flags = _command_parts(args, "label.py import PAIRS.jsonl --experiment E --out FILE.json", set())
    out = Path(flags.pop("out"))
    seed = options.pop_int(flags, "seed", 0)
    task, encoding = _task_and_encoding(flags)
    try:
        text = storage.fetch(source).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source}: not a UTF-8 text file ({e})") from None
    pairs = interchange.read_pairs(text, source, task, encoding)
    imported = interchange.import_records(pairs, task, encoding, seed)
    skipped = "; ".join(interchange.skipped_summary(imported.skipped))
    if not imported.records:
        raise UserError(f"{source}: none of its {len(pairs)} pairs fits the task: {skipped}")
    label_files.write(imported.records, out)
    print(f"wrote {len(imported.records)} best_of_2 records from {len(pairs)} pairs to {out}")
    if skipped:
        print(f"skipped {len(pairs) - len(imported.records)}: {skipped}")
