"""Where a run's labels come from: its `labels.source`.

- a label file: a local path, an `https://` URL or one of the original `gs://` paths;
- `mock:<labeler>[:<noise>]`: a mock labeler (`mock_labelers`). An offline run collects its own
  labels on the initial policy's samples before training (`collect_mock_labels`), writes them in
  the released schema and then reads them like any label file; an online run asks the labeler
  about the current policy's samples in every round;
- `app[:<port>]` (online runs only): people, through the labeling app that rank 0 serves.

Runs that collect their own labels collect a quarter more than they train on and hold those out.
"""

from pathlib import Path

from lm_human_preferences.labeling import collect, label_files, label_types, mock_labelers
from lm_human_preferences.task import lm_tasks
from lm_human_preferences.task.policy import load_policy
from lm_human_preferences.utils import distributed, logging
from lm_human_preferences.utils.errors import UserError

HELD_OUT_SHARE = 4  # collect num_train · (1 + 1/4) records: the last fifth is held out
APP = "app"
DEFAULT_APP_PORT = 8000


def is_mock(source: str) -> bool:
    return source.startswith(mock_labelers.MOCK_PREFIX)


def app_port(source: str) -> int | None:
    """The port of an `app[:<port>]` label source; None for other sources."""
    name, _, port = source.partition(":")
    if name != APP:
        return None
    if not port:
        return DEFAULT_APP_PORT
    if not port.isdigit() or int(port) > 65535:
        raise UserError(f"labels.source {source}: write app or app:<port>, a port 0..65535 (0: any free one)")
    return int(port)


def check_mock(source: str, label_type_name: str) -> None:
    """A mock source names a known labeler (and a valid noise), and the label type is best-of-N."""
    mock_labelers.parse_source(source)
    collect.count_responses(label_type_name)


def check_online(source: str, label_type_name: str) -> None:
    """An online run collects its own labels: from a mock labeler (best-of-N) or from people."""
    if is_mock(source):
        check_mock(source, label_type_name)
    elif app_port(source) is not None:
        label_types.get(label_type_name)
    else:
        raise UserError(f"rewards.online collects its own labels: rewards.train_new_model.labels.source must be "
                        f"mock:<labeler>[:<noise>] or app[:<port>] (people, through the labeling app), not {source!r}")


def held_out_count(num_train: int) -> int:
    """The held-out records collected beside `num_train` training ones."""
    return num_train // HELD_OUT_SHARE


def collect_mock_labels(task: lm_tasks.TaskHParams, label_type_name: str, num_train: int, source: str, path: Path,
                        seed: int, chunk_size: int | None) -> None:
    """Label the initial policy's samples with the mock labeler of `source`; write them to `path`."""
    labeler_name, noise = mock_labelers.parse_source(source)
    n_responses = collect.count_responses(label_type_name)
    num_records = num_train + held_out_count(num_train)
    logging.print_main(f"labelling {num_records} queries × {n_responses} responses with the {labeler_name!r} "
                       f"mock labeler (noise {noise}) → {path}")
    labeler = collect.MockLabeler(labeler_name, noise, seed)
    policy = load_policy(task.policy.initial_model, task, device=distributed.device())
    records = collect.collect(policy, task, labeler, num_records, n_responses, seed, chunk_size)
    label_files.write(records, path)

