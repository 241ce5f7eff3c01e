"""`launch.py fetch TARGET ... [--from DIR] [--dry_run]`: put everything a run needs into the cache.

A target is an experiment, a GPT-2 model name, or a remote file or folder. Each is fetched by the
code that reads it in a run (model loaders, encodings, query datasets, label files), so the cache
ends up holding exactly what a run reads, the layouts a run probes for and does not find included
(the cache's NOT_FOUND list), and nothing a run would still have to ask the network about.
"""

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lm_human_preferences import experiments
from lm_human_preferences.cli import options
from lm_human_preferences.language import datasets, encodings, trained_models
from lm_human_preferences.language.corpora import books, cnndm, tldr
from lm_human_preferences.task import rewards
from lm_human_preferences.training import train_policy
from lm_human_preferences.utils import cache, save_folders, storage
from lm_human_preferences.utils.errors import UserError

FETCH_HELP = """\
usage: launch.py fetch TARGET [TARGET ...] [--from DIR] [--dry_run]
       (also lmhp-fetch TARGET ...)

Download everything the targets need into the cache (LMHP_CACHE_DIR, default
~/.cache/lm_human_preferences), laid out as the URLs are, with the SHA-256 of every file in
<cache>/SHA256SUMS. Files already in the cache are not downloaded again. Checkpoints are read
once fetched, which checks the TensorFlow checkpoints' CRC-32C and our checkpoints' SHA-256.

targets:
  EXPERIMENT         a train_reward or train_policy experiment: its models, encoding, label files
                     and query datasets; one of
                     %(experiments)s
  MODEL              a GPT-2 model: %(models)s
  gs://... https://...  a file, or a model, reward-model or run folder (a path whose last part
                     has no '.' is taken for a folder), e.g. gs://lm-human-preferences/runs/descriptiveness

options:
  --from DIR         read the files from DIR instead of the network: a copy of the files in their
                     URL layout (DIR/gpt-2/models/124M/hparams.json, DIR/lm-human-preferences/...),
                     or a cache folder copied from another machine; DIR's SHA256SUMS, if any, is checked
  --dry_run          list what would be fetched, with sizes where known, and download nothing

Air-gapped machines, in two steps: `./launch.py fetch EXPERIMENT` where there is a network, then
copy its cache folder to the other machine's cache folder (or anywhere, and there run
`./launch.py fetch EXPERIMENT --from THAT_COPY`).
"""

MODES = ("train", "test")  # the query splits runs read: training and normalization, samples and sample.py


@dataclass(frozen=True)
class Item:
    """One thing to fetch: `kind` is model, reward_model, folder (looked into when fetched), dataset or file."""

    kind: str
    name: str


def fetch_command(args: list[str]) -> None:
    if not args or "--help" in args or "-h" in args:
        print(FETCH_HELP % dict(experiments=", ".join(sorted({*experiments.TRAIN_REWARD, *experiments.TRAIN_POLICY})),
                                models=", ".join(trained_models.GPT2_MODELS)))
        if not args:
            raise UserError("give an experiment, a model or a URL to fetch")
        return
    count = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    targets, flags = args[:count], options.parse(args[count:], booleans={"dry_run"})
    source = flags.pop("from", None)
    dry_run = options.pop_bool(flags, "dry_run")
    if flags:
        raise UserError(f"unknown option --{next(iter(flags))} (see launch.py fetch --help)")
    if not targets:
        raise UserError("give an experiment, a model or a URL to fetch (see launch.py fetch --help)")
    items = list(dict.fromkeys(item for target in targets for item in expand(target)))
    if not items:
        print(f"nothing to download: {' '.join(targets)} read only what the package ships")
        return
    with _reading_from(source):
        if dry_run:
            list_items(items)
            return
        for item in items:
            print(f"{item.kind} {item.name}: {fetch_item(item)}", flush=True)
    root = cache.cache_dir()
    print(f"cache: {root} (SHA-256 of every file in {root / cache.SHA256SUMS}; "
          f"check them with `cd {root} && sha256sum -c {cache.SHA256SUMS}`)")


@contextlib.contextmanager
def _reading_from(source: str | None) -> Iterator[None]:
    """With --from DIR: LMHP_MIRROR=DIR for the command (storage reads the public files from DIR)."""
    if source is None:
        yield
        return
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise UserError(f"--from {source}: no such folder; give a copy of the files in their URL layout "
                        "(DIR/gpt-2/..., DIR/lm-human-preferences/...) or a copied cache folder")
    before = os.environ.get("LMHP_MIRROR")
    os.environ["LMHP_MIRROR"] = str(folder.resolve())
    try:
        yield
    finally:
        if before is None:
            del os.environ["LMHP_MIRROR"]
        else:
            os.environ["LMHP_MIRROR"] = before


def expand(target: str) -> list[Item]:
    """The items a command-line target stands for."""
    if target in experiments.TRAIN_REWARD or target in experiments.TRAIN_POLICY:
        return experiment_items(target)
    if target in trained_models.GPT2_MODELS:
        return [Item("model", target)]
    if storage.is_remote(target):
        last = target.rstrip("/").rsplit("/", 1)[-1]
        return [Item("file" if "." in last else "folder", target.rstrip("/"))]
    raise UserError(f"cannot fetch {target!r}: give an experiment ({', '.join(experiments.TRAIN_POLICY)}), a GPT-2 "
                    f"model ({', '.join(trained_models.GPT2_MODELS)}) or a gs:// or https:// path")


def experiment_items(name: str) -> list[Item]:
    """Models, label files and query datasets of the experiment, as train_reward and train_policy run it."""
    items = []
    for mode in ("train_reward", "train_policy"):
        if name not in experiments.MODES[mode]:
            continue
        hp = experiments.get(mode, name)
        reward_hps = [hp] if mode == "train_reward" else [h for h in [hp.rewards.train_new_model] if h is not None]
        for task in [hp.task, *(h.task for h in reward_hps)]:
            items += [Item("model", task.policy.initial_model), Item("dataset", task.query_dataset)]
        items += [Item("file", h.labels.source) for h in reward_hps if storage.is_remote(h.labels.source)]
        if mode == "train_policy" and hp.rewards.trained_model is not None:
            items.append(Item("reward_model", hp.rewards.trained_model))
    return [item for item in items if _needs_download(item)]


def _needs_download(item: Item) -> bool:
    if item.kind == "model":
        return item.name in trained_models.GPT2_MODELS or storage.is_remote(item.name)
    if item.kind == "dataset":
        return item.name in ("books", "cnndm", "tldr") or any(
            storage.is_remote(part.removeprefix(datasets.LABELS_PREFIX)) for part in item.name.split(datasets.FALLBACK))
    return storage.is_remote(item.name)


def fetch_item(item: Item) -> str:
    """Fetch one item through the code that reads it in a run; what was checked."""
    if item.kind == "file":
        storage.fetch(item.name)
        return "ready"
    if item.kind == "dataset":
        return _fetch_dataset(item.name)
    if item.kind == "folder":
        return _fetch_folder(item.name)
    folder = rewards.reward_model_folder(item.name) if item.kind == "reward_model" else item.name
    return _fetch_model(folder)


def _fetch_model(name: str) -> str:
    saved = trained_models.load(trained_models.GPT2_URL.format(name=name) if name in trained_models.GPT2_MODELS
                                else name)
    encodings.fetch_files(saved.encoding)
    return f"ready ({len(saved.tensors)} tensors read and checked; encoding {saved.encoding!r})"


def _fetch_folder(url: str) -> str:
    """A run's save folder (its policy, its reward model if it has one, its task's test queries),
    a train_reward save folder, or a model folder."""
    if storage.exists(storage.join(url, save_folders.POLICY_HPARAMS)):
        hp = train_policy.HParams.from_json(storage.fetch(storage.join(url, save_folders.POLICY_HPARAMS)).read_text())
        done = [f"policy {_fetch_model(storage.join(url, save_folders.POLICY))}"]
        if storage.exists(storage.join(url, save_folders.REWARD_MODEL, "hparams.json")):
            done.append(f"reward model {_fetch_model(storage.join(url, save_folders.REWARD_MODEL))}")
        if _needs_download(Item("dataset", hp.task.query_dataset)):
            done.append(f"queries {_fetch_dataset(hp.task.query_dataset, modes=('test',))}")
        return "; ".join(done)
    if storage.exists(storage.join(url, save_folders.REWARD_MODEL, "hparams.json")):
        return _fetch_model(storage.join(url, save_folders.REWARD_MODEL))
    return _fetch_model(url)


def _fetch_dataset(dataset: str, modes: tuple[str, ...] = MODES) -> str:
    """Read every text of each split once (which downloads them), or the label file a fallback uses."""
    done = []
    for mode in modes:
        name = dataset
        if datasets.FALLBACK in name:
            name, _ = datasets.books_or_labels(name, mode)
        if name.startswith(datasets.LABELS_PREFIX):
            storage.fetch(name[len(datasets.LABELS_PREFIX):])
            done.append(f"{mode}: the queries of {name[len(datasets.LABELS_PREFIX):]}")
            continue
        count = sum(1 for _ in tqdm(datasets.get(name)(mode, 0), desc=f"{name} {mode}", unit=" texts", leave=False))
        done.append(f"{mode}: {count} texts")
    return "ready (" + "; ".join(done) + ")"


def known_files(item: Item) -> list[str]:
    """The URLs an item is known to need before any of them is read (for --dry_run); a folder's
    checkpoint files, and cnndm's stories, are named by files inside it."""
    if item.kind == "file":
        return [storage.canonical_url(item.name)]
    if item.kind == "model" and item.name in trained_models.GPT2_MODELS:
        folder = trained_models.GPT2_URL.format(name=item.name)
        return [storage.join(folder, f) for f in trained_models.GPT2_RELEASE_FILES] + \
            [storage.join(encodings.MAIN_URL, f) for f in encodings.MAIN_FILES]
    if item.kind == "dataset":
        urls = []
        for part in item.name.split(datasets.FALLBACK):
            if part.startswith(datasets.LABELS_PREFIX):
                urls.append(storage.canonical_url(part[len(datasets.LABELS_PREFIX):]))
            elif part == "books":
                urls += [books.URL.format(mode=mode) for mode in MODES]
            elif part == "tldr":
                urls += [tldr.URL.format(mode=mode) for mode in ("train", "valid")]
            elif part == "cnndm":
                urls += [f"{cnndm.BASE}/url_lists/all_{mode}.txt" for mode in MODES]
        return urls
    return []


def list_items(items: list[Item]) -> None:
    """--dry_run: each item's known files with their sizes (cached, in --from DIR, or asked of the server)."""
    total = 0
    for item in items:
        print(f"{item.kind} {item.name}")
        urls = known_files(item)
        for url in urls:
            state, size = storage.where(url)
            total += size or 0
            print(f"  {storage.gs_path(url)}  {_size_text(size)}  {state}")
        if not urls:
            print("  (its files are named by files inside it: listed once those are read)")
        elif item.kind == "dataset" and "cnndm" in item.name.split(datasets.FALLBACK):
            print("  (and every story the URL lists name)")
    print(f"known sizes: {_size_text(total)} in all")


def _size_text(size: int | None) -> str:
    if size is None:
        return "size unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")
