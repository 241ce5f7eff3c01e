"""A static HTML report of a run folder: `lmhp-report SAVE_DIR` writes SAVE_DIR/report.html and SAVE_DIR/report/*.png.

The page needs no server, no JavaScript and nothing from the network. The trainers call `write_report` when a run
ends or crashes, so any input may be missing, empty or unreadable: each such piece becomes a note in the page.
"""

import argparse
import contextlib
import html
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.backend.event_processing import event_accumulator

from lm_human_preferences.utils import save_folders
from lm_human_preferences.utils import storage
from lm_human_preferences.utils.errors import UserError

Scalars = dict[str, dict[int, float]]  # tag -> step -> value
Series = tuple[str, list[float], list[float]]  # legend label, x, y

REPORT_FILE, PLOT_DIR = save_folders.REPORT, save_folders.REPORT_PLOTS
HPARAMS_FILES = (save_folders.REWARD_HPARAMS, save_folders.POLICY_HPARAMS, save_folders.DPO_HPARAMS)
RUN_FILES = (*HPARAMS_FILES, save_folders.REWARD_SUMMARY, save_folders.DPO_SUMMARY, save_folders.MOCK_SUMMARY,
             save_folders.SAMPLES, save_folders.TENSORBOARD)
FIGSIZE, DPI = (6, 3.2), 90
NORM_COLUMNS = ["mean_before", "std_before", "target_mean", "target_std", "gain", "bias", "mean_after", "std_after"]

# (file stem, title, [(tag, legend label)]) for the PPO plots drawn from the tags alone.
PPO_PLOTS = [
    ("ppo_score", "Reward model score",
     [("objective/score", "score"), ("objective/score_total", "score − KL penalty")]),
    ("ppo_kl_coef", "KL coefficient", [("objective/kl_coef", "kl_coef")]),
    ("ppo_kl_negative", "Responses with a negative log-ratio sum", [("objective/kl_negative_share", "share")]),
    ("ppo_entropy", "Policy entropy (nats per token)", [("ppo/policy/entropy", "entropy")]),
    ("ppo_value_error", "Value error (mean squared)", [("ppo/val/error", "value error")]),
    ("ppo_var_explained", "Value function: explained variance of returns", [("ppo/val/var_explained", "explained")]),
    ("ppo_clipfrac", "Clip fractions", [("ppo/policy/clipfrac", "policy"), ("ppo/val/clipfrac", "value")]),
]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 80em; padding: 0 1em; color: #222; }
h1 { margin-bottom: .2em; } .sub { color: #666; margin-top: 0; }
.headline { border: 2px solid #36c; border-radius: 6px; padding: .6em 1em; background: #f3f7ff; }
.headline li { font-size: 1.15em; margin: .2em 0; }
.note { background: #fff6e0; border-left: 4px solid #e0a000; padding: .3em .7em; }
.plots img { margin: .3em; border: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } th, td { border: 1px solid #ccc; padding: .25em .5em; }
td.text { white-space: pre-wrap; font-family: monospace; vertical-align: top; min-width: 12em; max-width: 36em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } pre { background: #f6f6f6; padding: .7em; }
"""


@dataclass
class Page:
    """Where the plots go, and the file names of those written so far."""

    plot_dir: Path
    plots: list[str] = field(default_factory=list)


def fmt(value: Any) -> str:
    """Numbers as the page prints them: floats to 4 significant digits, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def notes_html(notes: list[str]) -> str:
    return "".join(note(n) for n in notes)


def read_json(path: Path, notes: list[str], why_missing: str) -> Any:
    """The JSON value at `path`, or None with a note saying the file is missing or unreadable."""
    if not path.is_file():
        notes.append(f"no {path.name} ({why_missing})")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        notes.append(f"{path.name} could not be read: {error}")
        return None


def read_event_file(path: Path) -> tuple[float, Scalars]:
    """(earliest wall time, scalars) of one event file; a garbled tail or file just yields fewer scalars."""
    accumulator = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    scalars, first = {}, float("inf")
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        scalars[tag] = {e.step: e.value for e in events}
        first = min([first, *(e.wall_time for e in events)])
    return first, scalars


def read_scalars(folder: Path, notes: list[str], why_missing: str) -> Scalars:
    """All scalars under `folder`, event files merged by step in the order they were written (later ones win)."""
    event_files = sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
    loaded = []
    for path in event_files:
        try:
            loaded.append(read_event_file(path))
        except Exception as error:  # a damaged file must not cost the rest of the report
            notes.append(f"{path.name} could not be read: {error}")
    merged: Scalars = {}
    for _, scalars in sorted(loaded, key=lambda item: item[0]):
        for tag, values in scalars.items():
            merged.setdefault(tag, {}).update(values)
    if not merged:
        found = f"{len(event_files)} event file(s) without scalars" if event_files else "no event files"
        notes.append(f"no logs in {folder.name}: {found} ({why_missing})")
    return merged


def dig(value: Any, *keys: str) -> Any:
    """value[k1][k2]..., or None where a level is missing or not a dict."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def series(scalars: Scalars, tag: str, x_of: dict[int, float] | None = None) -> tuple[list[float], list[float]]:
    """(x, y) of a tag in step order; x is `x_of[step]`, or the step itself without `x_of`."""
    steps = sorted(scalars.get(tag, {}))
    return [x_of[s] for s in steps] if x_of else steps, [scalars[tag][s] for s in steps]


def episode_axis(scalars: Scalars) -> dict[int, float] | None:
    """step -> episodes so far, when elapsed/episodes was logged at every step that logged anything."""
    episodes = scalars.get("elapsed/episodes")
    steps = set().union(*scalars.values())
    return episodes if episodes and steps <= set(episodes) else None


def running_mean(y: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(np.pad(y, (window - 1, 0), mode="edge"), kernel, mode="valid")


def draw(page: Page, stem: str, title: str, xlabel: str, lines: list[Series], band: float | None = None) -> None:
    """Write one small PNG; long finite series get a running mean over their raw values."""
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for label, x, y in lines:
        values = np.asarray(y, dtype=float)
        values[~np.isfinite(values)] = np.nan
        smooth = len(values) >= 40 and np.isfinite(values).all()
        (raw,) = axes.plot(x, values, label=label, lw=1, alpha=0.35 if smooth else 1,
                           marker="o" if len(x) < 30 else None, ms=3)
        if smooth:
            axes.plot(x, running_mean(values, len(values) // 20), color=raw.get_color(), lw=1.8)
    if band is not None:
        axes.axhspan(0.5 * band, 1.5 * band, color="tab:green", alpha=0.15, label=f"target {band:g} ±50%")
        axes.axhline(band, color="tab:green", lw=1, ls="--")
    axes.set_title(title, fontsize="medium")
    axes.set_xlabel(xlabel)
    axes.grid(alpha=0.3)
    if len(lines) > 1 or band is not None:
        axes.legend(fontsize="small")
    page.plot_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(page.plot_dir / f"{stem}.png")
    page.plots.append(f"{stem}.png")


def plot(page: Page, stem: str, title: str, xlabel: str, lines: list[Series], band: float | None = None) -> str:
    """The <img> of a plot, or a note when it could not be drawn."""
    lines = [line for line in lines if line[1]]
    if not lines:
        return ""
    try:
        draw(page, stem, title, xlabel, lines, band)
    except Exception as error:  # one bad plot must not cost the rest of the report
        return note(f"could not draw {title}: {error}")
    width, height = (round(inches * DPI) for inches in FIGSIZE)
    source = html.escape(f"{PLOT_DIR}/{stem}.png")
    return f'<img src="{source}" alt="{html.escape(title)}" width="{width}" height="{height}">'


def table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; numbers right-aligned, everything escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{html.escape(fmt(v))}</td>' if isinstance(v, (int, float))
                                    else f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def last_values(scalars: Scalars) -> str:
    rows = [[tag, len(v), max(v), v[max(v)]] for tag, v in sorted(scalars.items()) if v]
    header = ["tag", "points", "last step", "last value"]
    return f"<details><summary>All logged scalars</summary>{table(header, rows)}</details>"


def reward_section(page: Page, summary: Any, scalars: Scalars, notes: list[str]) -> str:
    parts = ["<h2>Reward model</h2>"]
    train_tags = sorted(t for t in scalars if t.startswith("train/"))
    images = [plot(page, "reward_" + tag.replace("/", "_"), tag, "batch", [(tag, *series(scalars, tag))])
              for tag in train_tags]
    parts.append(f'<div class="plots">{"".join(images)}</div>')
    summary = summary if isinstance(summary, dict) else {}
    norm = [[key, *(summary[key].get(c) for c in NORM_COLUMNS)] for key in ("normalize_before", "normalize_after")
            if isinstance(summary.get(key), dict)]
    if norm:
        parts += ["<h3>Reward normalization</h3>", table(["when", *NORM_COLUMNS], norm)]
    heldout = heldout_metrics(summary, scalars)
    if heldout:
        parts += ["<h3>Held-out labels</h3>", table(list(heldout), [list(heldout.values())])]
    else:
        notes.append("no held-out metrics (no labels were held out, or reward training did not finish)")
    if scalars:
        parts.append(last_values(scalars))
    return "".join(parts) + notes_html(notes)


def heldout_metrics(summary: dict, scalars: Scalars) -> dict[str, Any]:
    """Held-out metrics from the summary, else from the heldout/* scalars logged at the end of reward training."""
    if isinstance(summary.get("heldout"), dict):
        return summary["heldout"]
    return {tag.removeprefix("heldout/"): v[max(v)] for tag, v in sorted(scalars.items()) if tag.startswith("heldout/")}


def kl_target(policy_hparams: Any) -> float | None:
    """The adaptive KL controller's target, or None for a fixed KL coefficient."""
    target = dig(policy_hparams, "rewards", "adaptive_kl", "target")
    return float(target) if isinstance(target, (int, float)) and target > 0 else None


def speed_plot(page: Page, scalars: Scalars, x_of: dict[int, float] | None, xlabel: str) -> str:
    """Episodes per second between consecutive updates; without a clock, elapsed/fps (response tokens per second)."""
    episodes, clock = scalars.get("elapsed/episodes", {}), scalars.get("elapsed/time", {})
    steps = sorted(set(episodes) & set(clock))
    pairs = [(episodes[b], (episodes[b] - episodes[a]) / (clock[b] - clock[a])) for a, b in zip(steps, steps[1:])
             if clock[b] > clock[a]]  # a resumed run restarts its clock
    if pairs:
        return plot(page, "ppo_speed", "Episodes per second", "episodes", [("episodes/s", *map(list, zip(*pairs)))])
    return plot(page, "ppo_speed", "Response tokens per second (elapsed/fps)", xlabel,
                [("tokens/s", *series(scalars, "elapsed/fps", x_of))])


def ppo_section(page: Page, scalars: Scalars, policy_hparams: Any, notes: list[str]) -> str:
    if not scalars:
        return "<h2>PPO</h2>" + notes_html(notes)
    x_of = episode_axis(scalars)
    xlabel = "episodes" if x_of else "update"
    images = [plot(page, "ppo_kl", "KL(policy ‖ initial policy)", xlabel,
                   [("kl", *series(scalars, "objective/kl", x_of)), ("k3", *series(scalars, "objective/kl_k3", x_of))],
                   band=kl_target(policy_hparams))]
    for stem, title, tags in PPO_PLOTS:
        images.append(plot(page, stem, title, xlabel, [(label, *series(scalars, tag, x_of)) for tag, label in tags]))
    images.append(speed_plot(page, scalars, x_of, xlabel))
    if kl_target(policy_hparams) is None:
        notes.append("fixed KL coefficient (no rewards.adaptive_kl target), so the KL plot has no target band")
    return f'<h2>PPO</h2><div class="plots">{"".join(images)}</div>{last_values(scalars)}{notes_html(notes)}'


def dpo_section(page: Page, summary: Any, scalars: Scalars, notes: list[str]) -> str:
    """A DPO run's curves (loss, accuracy, implicit rewards and margin by batch) and held-out metrics."""
    images = [plot(page, tag.replace("/", "_"), tag, "batch", [(tag, *series(scalars, tag))])
              for tag in sorted(scalars) if tag.startswith("dpo/")]
    parts = ["<h2>DPO</h2>", f'<div class="plots">{"".join(images)}</div>']
    heldout = heldout_metrics(summary if isinstance(summary, dict) else {}, scalars)
    if heldout:
        parts += ["<h3>Held-out labels (the implicit reward)</h3>", table(list(heldout), [list(heldout.values())])]
    if scalars:
        parts.append(last_values(scalars))
    return "".join(parts) + notes_html(notes)


def seeds(hparams: dict[str, Any]) -> list[tuple[str, Any]]:
    """(which, seed) for each run found; the reward model's own seed inside train_policy's hparams counts too."""
    found = [(what, dig(hparams.get(name), "run", "seed"))
             for name, what in ((save_folders.REWARD_HPARAMS, "reward model"), (save_folders.POLICY_HPARAMS, "policy"),
                                (save_folders.DPO_HPARAMS, "DPO policy"))
             if name in hparams]
    nested = dig(hparams.get(save_folders.POLICY_HPARAMS), "rewards", "train_new_model")
    if save_folders.REWARD_HPARAMS not in hparams and isinstance(nested, dict):
        found.insert(0, ("reward model", dig(nested, "run", "seed")))
    return found


def bold(value: Any) -> str:
    return f"<b>{html.escape(fmt(value))}</b>"


def headline(mock: Any, reward_summary: Any, ppo: Scalars, seed_list: list[tuple[str, Any]]) -> str:
    """The numbers to read first: the labeler's verdict (mock runs), held-out metrics, final KL and score, seeds."""
    mock = mock if isinstance(mock, dict) else {}
    items = []
    if "true_score_before" in mock or "true_score_after" in mock:
        items.append(f"True score by the labeler ({html.escape(fmt(mock.get('labeler')))}): "
                     f"{bold(mock.get('true_score_before'))} before PPO → {bold(mock.get('true_score_after'))} after")
    if isinstance(mock.get("win_rate"), (int, float)):
        items.append(f"Win rate against the initial policy: <b>{mock['win_rate']:.1%}</b> (share of test queries where "
                     "the labeler prefers the trained policy's response; ties count half)")
    heldout = heldout_metrics(reward_summary if isinstance(reward_summary, dict) else {}, {})
    accuracy = mock.get("reward_model_heldout_accuracy", heldout.get("accuracy"))
    if accuracy is not None:
        chance, count = mock.get("chance", heldout.get("chance")), mock.get("heldout_count", heldout.get("count"))
        items.append(f"Reward model held-out accuracy: {bold(accuracy)} (chance {html.escape(fmt(chance))}, "
                     f"{html.escape(fmt(count))} labels)")
    elif heldout:
        items.append("Reward model held-out: " + ", ".join(f"{html.escape(k)} {bold(v)}" for k, v in heldout.items()))
    kl = mock.get("final_kl", last(ppo, "objective/kl"))
    if kl is not None:
        coef = mock.get("final_kl_coef", last(ppo, "objective/kl_coef"))
        items.append(f"Final KL: {bold(kl)} (kl_coef {html.escape(fmt(coef))})")
    if "objective/score" in ppo:
        items.append(f"Final reward model score: {bold(last(ppo, 'objective/score'))}")
    for what, seed in seed_list:
        items.append(f"Seed ({what}): {bold(seed if seed is not None else 'not recorded (drawn at random)')}")
    if not items:
        return '<div class="headline">No headline numbers: the run left no summaries, logs or hparams.</div>'
    return '<div class="headline"><ul>' + "".join(f"<li>{item}</li>" for item in items) + "</ul></div>"


def last(scalars: Scalars, tag: str) -> float | None:
    values = scalars.get(tag)
    return values[max(values)] if values else None


def samples_section(mock: Any, samples_file: Path, notes: list[str]) -> str:
    """Before/after samples from mock_summary.json, else samples.json."""
    samples = mock.get("samples") if isinstance(mock, dict) else None
    if samples is None:
        samples = read_json(samples_file, notes, "the run saved no before/after samples")
    parts = ["<h2>Samples before and after PPO</h2>"]
    rows = [s for s in samples if isinstance(s, dict)] if isinstance(samples, list) else []
    if samples is not None and not rows:
        notes.append("no usable samples: expected a list of {query, before, after} objects")
    if rows:
        parts.append("<table><tr><th>query</th><th>before</th><th>after</th></tr>")
        for s in rows:
            cells = [text_cell(s.get("query")), text_cell(s.get("before"), s.get("before_score")),
                     text_cell(s.get("after"), s.get("after_score"))]
            parts.append(f"<tr>{''.join(cells)}</tr>")
        parts.append("</table>")
    return "".join(parts) + notes_html(notes)


def text_cell(text: Any, score: Any = None) -> str:
    scored = f"\n<b>score {html.escape(fmt(score))}</b>" if isinstance(score, (int, float)) else ""
    return f'<td class="text">{html.escape(fmt(text))}{scored}</td>'


def hparams_section(hparams: dict[str, Any], notes: list[str]) -> str:
    parts = ["<h2>Hyperparameters</h2>"]
    for name, value in hparams.items():
        pretty = html.escape(json.dumps(value, indent=2, sort_keys=True))
        parts.append(f"<details><summary>{html.escape(name)}</summary><pre>{pretty}</pre></details>")
    return "".join(parts) + notes_html(notes)


def read_hparams(folder: Path, notes: list[str]) -> dict[str, Any]:
    """{file name: hparams} of the trainers' hparams files that could be read."""
    found = {name: read_json(folder / name, [], "") for name in HPARAMS_FILES if (folder / name).exists()}
    notes += [f"{name} could not be read as JSON" for name, value in found.items() if value is None]
    if not found:
        notes.append(f"no hparams files ({', '.join(HPARAMS_FILES)}): the run did not get as far as starting")
    return {name: value for name, value in found.items() if value is not None}


def safely(title: str, build: Callable[[], str]) -> str:
    """A section's HTML; an input shaped in a way no section foresaw costs that section only, with a note."""
    try:
        return build()
    except Exception as error:
        return f"<h2>{html.escape(title)}</h2>" + note(f"this section could not be shown: {error!r}")


def render(folder: Path, page: Page) -> str:
    """The whole page; each section ends with notes on what it lacks."""
    hparams_notes, reward_notes, ppo_notes, mock_notes, sample_notes = [], [], [], [], []
    hparams = read_hparams(folder, hparams_notes)
    reward_summary = read_json(folder / save_folders.REWARD_SUMMARY, reward_notes,
                               "reward training did not finish, or this run loaded a trained reward model")
    logs = folder / save_folders.TENSORBOARD
    reward_tb = read_scalars(logs / save_folders.REWARD_MODEL, reward_notes, "no reward model was trained in this "
                             "run folder, or it stopped before its first batch")
    ppo_tb = read_scalars(logs / save_folders.PPO_LOG, ppo_notes, "the run may have stopped before its first update, "
                          "or it only trained a reward model")
    mock = read_json(folder / save_folders.MOCK_SUMMARY, mock_notes, "only offline demo runs on mock labels have one")
    training = [safely("Reward model", lambda: reward_section(page, reward_summary, reward_tb, reward_notes)),
                safely("PPO", lambda: ppo_section(page, ppo_tb, hparams.get(save_folders.POLICY_HPARAMS), ppo_notes))]
    if save_folders.DPO_HPARAMS in hparams:  # a DPO run trains no reward model and runs no PPO
        dpo_notes: list[str] = []
        dpo_summary = read_json(folder / save_folders.DPO_SUMMARY, dpo_notes, "DPO training did not finish")
        dpo_tb = read_scalars(logs / save_folders.DPO_LOG, dpo_notes, "the run stopped before its first batch")
        training = [safely("DPO", lambda: dpo_section(page, dpo_summary, dpo_tb, dpo_notes))]
    sections = [
        safely("Summary", lambda: headline(mock, reward_summary, ppo_tb, seeds(hparams)) + notes_html(mock_notes)),
        *training,
        safely("Samples", lambda: samples_section(mock, folder / save_folders.SAMPLES, sample_notes)),
        safely("Hyperparameters", lambda: hparams_section(hparams, hparams_notes)),
    ]
    title = html.escape(f"Run report: {folder.resolve().name}")
    generated = html.escape(f"{folder.resolve()} — generated {datetime.now().isoformat(timespec='seconds')}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<style>{STYLE}</style></head><body><h1>{title}</h1><p class="sub">{generated}</p>'
            f'{"".join(sections)}</body></html>\n')


def remove_stale_plots(page: Page) -> None:
    """Delete PNGs an earlier report drew that this one did not; one that cannot be deleted is merely unused."""
    for stale in page.plot_dir.glob("*.png") if page.plot_dir.is_dir() else []:
        if stale.name not in page.plots:
            with contextlib.suppress(OSError):
                stale.unlink()


def write_report(save_dir: Path) -> Path:
    """Write save_dir/report.html and its plots; returns the page's path.

    Missing, empty or unreadable inputs become notes in the page; only a failure to write the page itself raises
    (UserError, from storage.atomic_write_text).
    """
    save_dir = Path(save_dir)
    page = Page(save_dir / PLOT_DIR)
    text = render(save_dir, page)
    remove_stale_plots(page)
    storage.atomic_write_text(save_dir / REPORT_FILE, text)
    return save_dir / REPORT_FILE


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmhp-report", description="Write SAVE_DIR/report.html (plots in "
                                     "SAVE_DIR/report/) from a run folder's logs, summaries and hparams.")
    parser.add_argument("save_dir", type=Path, help="a run folder (the run.save_dir of a training run)")
    save_dir = parser.parse_args(args).save_dir
    if not save_dir.is_dir():
        print(f"error: {save_dir}: no such folder", file=sys.stderr)
        return 1
    if not any((save_dir / name).exists() for name in RUN_FILES):
        print(f"error: {save_dir} holds none of a run's files ({', '.join(RUN_FILES)})", file=sys.stderr)
        return 1
    try:
        print(write_report(save_dir))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def main_entry() -> None:
    sys.exit(main(sys.argv[1:]))
