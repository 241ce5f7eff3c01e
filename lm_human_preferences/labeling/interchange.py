"""Label files ↔ the text preference pairs of today's tools (TRL, OpenRLHF, Hugging Face `datasets`).

Export turns label records (token ids, the released schema) into JSON Lines text records:
    best_of_N       the best response against each other one: N − 1 {"prompt", "chosen", "rejected"}
    scalar_compare  one pair by the sign of `difference` (sample1 is chosen when it is positive);
                    a difference of 0 prefers neither response, so such records are counted, not written
    scalar_rating   {"prompt", "completion", "score"}
The prompt is the query as the model reads it (the task's query_prefix + query + query_suffix);
padding is dropped. With ids kept, `prompt_ids` are the query's own tokens (without the prefix and
suffix, which the task adds itself) and every id list has its trailing padding removed.

Import turns text pairs into best_of_2 records tokenized as the task formats queries and
responses: each text encoded alone, right-padded with the padding token to task.query_length /
task.response_length. A pair that the task could not have produced is skipped and counted by
reason, never cut to fit.
"""

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lm_human_preferences.labeling.label_files import Labels
from lm_human_preferences.labeling.label_types import BestOfN, LabelType, ScalarCompare, ScalarRating
from lm_human_preferences.language.encodings import Encoding
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.utils.errors import UserError

ID_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")


def trim_padding(tokens, padding_token: int) -> list[int]:
    """The token ids without their trailing padding."""
    ids = [int(t) for t in tokens]
    while ids and ids[-1] == padding_token:
        ids.pop()
    return ids


def prompt_text(query, task: lm_tasks.TaskHParams, encoding: Encoding) -> str:
    return task.query_prefix + encoding.decode(query) + task.query_suffix


# --- export -------------------------------------------------------------------------------------


@dataclass
class Exported:
    records: list[dict]
    ties: int = 0  # scalar_compare records with difference 0, left out


def _pair(prompt: str, query, chosen, rejected, encoding: Encoding, keep_ids: bool) -> dict:
    record = {"prompt": prompt, "chosen": encoding.decode(chosen), "rejected": encoding.decode(rejected)}
    if keep_ids:
        pad = encoding.padding_token
        record.update(prompt_ids=trim_padding(query, pad), chosen_ids=trim_padding(chosen, pad),
                      rejected_ids=trim_padding(rejected, pad))
    return record


def export_records(labels: Labels, label_type: LabelType, task: lm_tasks.TaskHParams, encoding: Encoding,
                   keep_ids: bool = False) -> Exported:
    """The text records of every label record, in file order."""
    columns = labels.columns
    responses = [columns[key] for key in label_type.response_keys]
    values = columns[label_type.label_key]
    exported = Exported([])
    for i, query in enumerate(columns["query"]):
        prompt = prompt_text(query, task, encoding)
        if isinstance(label_type, BestOfN):
            best = int(values[i])
            exported.records.extend(_pair(prompt, query, responses[best][i], responses[j][i], encoding, keep_ids)
                                    for j in range(len(responses)) if j != best)
        elif isinstance(label_type, ScalarCompare):
            difference = float(values[i])
            if difference == 0:
                exported.ties += 1
                continue
            better, worse = (1, 0) if difference > 0 else (0, 1)
            exported.records.append(_pair(prompt, query, responses[better][i], responses[worse][i], encoding,
                                          keep_ids))
        elif isinstance(label_type, ScalarRating):
            record = {"prompt": prompt, "completion": encoding.decode(responses[0][i]), "score": float(values[i])}
            if keep_ids:
                pad = encoding.padding_token
                record.update(prompt_ids=trim_padding(query, pad), completion_ids=trim_padding(responses[0][i], pad))
            exported.records.append(record)
        else:
            raise UserError(f"cannot export labels of type {label_type.name}")
    return exported


def jsonl(records: list[dict]) -> str:
    """JSON Lines, one record a line, UTF-8 text as it is (not \\u-escaped)."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def detect_type(first: dict, source: str) -> str:
    """The label type whose keys the first record of a label file has."""
    if "best" in first:
        n = sum(1 for key in first if key.startswith("sample") and key[6:].isdigit())
        return f"best_of_{n}"
    if "difference" in first:
        return "scalar_compare"
    if "score" in first and "sample" in first:
        return "scalar_rating"
    raise UserError(f"{source}: record 0 has keys {sorted(first)}, not those of a best_of_N, scalar_compare or "
                    "scalar_rating label; is it a label file? (or name the type with --type)")


# --- import -------------------------------------------------------------------------------------


def strip_prefix_suffix(prompt: str, task: lm_tasks.TaskHParams) -> str:
    """The query text of a prompt: the task's query_prefix and query_suffix removed where present
    (the task adds them itself, so they must not be doubled)."""
    if task.query_prefix and prompt.startswith(task.query_prefix):
        prompt = prompt[len(task.query_prefix):]
    if task.query_suffix and prompt.endswith(task.query_suffix):
        prompt = prompt[:-len(task.query_suffix)]
    return prompt


@dataclass(frozen=True)
class Pair:
    """One line of a pairs file: a query's text (the prompt without the task's prefix and suffix)
    and two responses, the first preferred."""

    line: int  # 1-based
    query: str
    chosen: str
    rejected: str
    ids: tuple[list[int], list[int], list[int]] | None = None  # prompt (query), chosen, rejected, when given


def read_pairs(text: str, source: str, task: lm_tasks.TaskHParams, encoding: Encoding) -> list[Pair]:
    """Every pair of a JSON Lines file (blank lines are skipped); bad lines are a UserError naming them."""
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            pairs.append(_parse_line(line, number, source, task, encoding))
    if not pairs:
        raise UserError(f"{source}: no pairs (expected JSON Lines of {{\"prompt\", \"chosen\", \"rejected\"}})")
    return pairs


def _parse_line(line: str, number: int, source: str, task: lm_tasks.TaskHParams, encoding: Encoding) -> Pair:
    where = f"{source}: line {number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not JSON ({e.msg}); the file must be JSON Lines, one object a line") from None
    if not isinstance(item, dict):
        raise UserError(f"{where} is a JSON {type(item).__name__}, not an object with 'chosen' and 'rejected'")
    for key in ("chosen", "rejected", *(("prompt",) if "prompt" in item else ())):
        if key not in item:
            raise UserError(f"{where} lacks {key!r}; each line needs 'chosen' and 'rejected', and 'prompt' "
                            "unless both texts start with their prompt")
        if not isinstance(item[key], str):
            raise UserError(f"{where}: {key!r} is a JSON {type(item[key]).__name__}, not a string; import reads "
                            "text pairs (apply a chat template to conversations first)")
    if "prompt" in item:
        prompt, chosen, rejected = item["prompt"], item["chosen"], item["rejected"]
    else:
        prompt, chosen, rejected = split_dialogue(item["chosen"], item["rejected"])
    texts = (strip_prefix_suffix(prompt, task), chosen, rejected)
    return Pair(number, *texts, _given_ids(item, where, encoding, texts))


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two texts that share their prompt.

    The split is at the end of their longest common prefix, moved back to the last place where
    both texts are at a whitespace character, so each response starts with that whitespace and a
    whole word (as a sampled response does: GPT-2's and kjv's tokens carry their leading space).
    No such place gives an empty prompt.
    """
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    split = common
    while split > 0 and not (split < len(chosen) and chosen[split].isspace()
                             and split < len(rejected) and rejected[split].isspace()):
        split -= 1
    return chosen[:split], chosen[split:], rejected[split:]


def _given_ids(item: dict, where: str, encoding: Encoding,
               texts: tuple[str, str, str]) -> tuple[list[int], list[int], list[int]] | None:
    """The token ids of a line written by export --keep-ids, checked against its texts (the
    query's text, the chosen and the rejected response)."""
    given = [key for key in ID_KEYS if key in item]
    if not given:
        return None
    if len(given) < len(ID_KEYS) or "prompt" not in item:
        raise UserError(f"{where} has {', '.join(given)} but needs 'prompt' and all of {', '.join(ID_KEYS)} "
                        "to use token ids; give all of them or none")
    ids = []
    for key, text in zip(ID_KEYS, texts):
        value = item[key]
        if not isinstance(value, list) or not all(type(t) is int for t in value):
            raise UserError(f"{where}: {key!r} must be a list of integer token ids")
        bad = [t for t in value if not (0 <= t < encoding.n_vocab or t == encoding.padding_token)]
        if bad:
            raise UserError(f"{where}: {key!r} holds token id {bad[0]}, outside the {encoding.name!r} vocabulary; "
                            "was it written for another experiment?")
        if encoding.decode(value) != text:
            raise UserError(f"{where}: {key!r} do not decode to the text beside them; drop the *_ids keys to "
                            "tokenize the texts instead")
        ids.append(value)
    return ids[0], ids[1], ids[2]


@dataclass
class Imported:
    records: list[dict]
    skipped: dict[str, list[int]] = field(default_factory=dict)  # reason → the lines skipped for it


def _tokens(pair: Pair, encoding: Encoding) -> tuple[list[int], list[int], list[int]]:
    if pair.ids is not None:
        return pair.ids
    return encoding.encode(pair.query), encoding.encode(pair.chosen), encoding.encode(pair.rejected)


def _padded(tokens: list[int], length: int, padding_token: int) -> list[int]:
    return tokens + [padding_token] * (length - len(tokens))


def problem(query: list[int], chosen: list[int], rejected: list[int], task: lm_tasks.TaskHParams,
            encoding: Encoding) -> str | None:
    """Why the task could not have produced this query and these responses, or None."""
    if not trim_padding(query, encoding.padding_token):
        return "empty prompt"
    if len(query) > task.query_length:
        return f"prompt longer than task.query_length ({task.query_length} tokens)"
    responses = [chosen, rejected]
    if any(not trim_padding(r, encoding.padding_token) for r in responses):
        return "empty response"
    if any(len(r) > task.response_length for r in responses):
        return f"response longer than task.response_length ({task.response_length} tokens)"
    padded = torch.tensor([_padded(r, task.response_length, encoding.padding_token) for r in responses])
    if not torch.equal(lm_tasks.postprocess_responses(task, padded, encoding.padding_token), padded):
        return f"response goes on after its truncate token {task.truncate_token} (the task would cut it there)"
    if padded[0].tolist() == padded[1].tolist():
        return "chosen and rejected are the same tokens"
    return None


def import_records(pairs: list[Pair], task: lm_tasks.TaskHParams, encoding: Encoding, seed: int = 0) -> Imported:
    """best_of_2 records of the pairs that fit the task, in file order.

    Which of sample0/sample1 holds the chosen response is drawn per record (from `seed`), so
    `best` is 0 or 1 alike: a reward model that scores both responses the same is then right only
    half the time, not always.
    """
    rng = random.Random(seed)
    imported = Imported([])
    pad = encoding.padding_token
    for pair in pairs:
        query, chosen, rejected = _tokens(pair, encoding)
        reason = problem(query, chosen, rejected, task, encoding)
        if reason:
            imported.skipped.setdefault(reason, []).append(pair.line)
            continue
        best = rng.randrange(2)
        samples = [rejected, chosen] if best else [chosen, rejected]
        imported.records.append({"query": _padded(query, task.query_length, pad),
                                 "sample0": _padded(samples[0], task.response_length, pad),
                                 "sample1": _padded(samples[1], task.response_length, pad), "best": best})
    return imported


def skipped_summary(skipped: dict[str, list[int]], shown: int = 5) -> Iterator[str]:
    """One line per reason: how many, and the first lines skipped for it."""
    for reason, lines in skipped.items():
        more = ", …" if len(lines) > shown else ""
        yield f"{len(lines)} {reason} (line {', '.join(map(str, lines[:shown]))}{more})"

