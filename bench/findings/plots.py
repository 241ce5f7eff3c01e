"""The findings' plots (docs/paper_*.png): mean lines with min–max bands over seeds."""

import statistics
from collections.abc import Callable
from pathlib import Path

from .cells import LABEL_COUNTS, ONLINE_KINDS, TARGET, Ceiling, Labels, sweep_kinds
from .tables import Results, of


def band(ax, xs: list[float], groups: list[list[float]], label: str, color: str, marker: str = "o") -> None:
    """Mean line with a min–max band over seeds, at the xs that have values."""
    points = [(x, g) for x, g in zip(xs, groups) if g]
    if not points:
        return
    x = [p[0] for p in points]
    ax.plot(x, [statistics.mean(g) for _, g in points], marker=marker, color=color, label=label)
    ax.fill_between(x, [min(g) for _, g in points], [max(g) for _, g in points], color=color, alpha=0.2)


def errorbars(ax, xs: list[list[float]], ys: list[list[float]], labels: list[str], colors: list[str]) -> None:
    """One point per condition at the means, with min–max bars on both axes."""
    for x, y, label, color in zip(xs, ys, labels, colors):
        if not x:
            continue
        mx, my = statistics.mean(x), statistics.mean(y)
        ax.errorbar([mx], [my], xerr=[[mx - min(x)], [max(x) - mx]], yerr=[[my - min(y)], [max(y) - my]], fmt="o",
                    color=color, label=label, capsize=3)


def figure(n: int, rows: int = 1):
    """pyplot, a figure of n panels in `rows` rows, and its axes in reading order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = -(-n // rows)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4 * rows), squeeze=False)
    return plt, fig, list(axes.flat)


def plot_labels(results: Results, experiments: list[str], path: Path) -> None:
    plt, fig, axes = figure(len(experiments))
    for ax, e in zip(axes, experiments):
        groups = [[m["score"] for m in of(results, e, Labels(n).name)] for n in LABEL_COUNTS]
        kls = [m["kl"] for n in LABEL_COUNTS for m in of(results, e, Labels(n).name)]
        band(ax, list(LABEL_COUNTS), groups, "reward model from N labels" + (
            f" (final KL {min(kls):.1f}–{max(kls):.1f})" if kls else ""), "C0")
        ms = of(results, e, Ceiling.name)
        if ms:
            scores, kl = [m["score"] for m in ms], statistics.mean(m["kl"] for m in ms)
            ax.axhline(statistics.mean(scores), color="C3", label=f"PPO on the labeler's score (final KL {kl:.1f})")
            ax.axhspan(min(scores), max(scores), color="C3", alpha=0.15)
        before = [m["score_before"] for n in LABEL_COUNTS for m in of(results, e, Labels(n).name)]
        if before:
            ax.axhline(statistics.mean(before), color="grey", linestyle=":", label="initial policy")
        ax.set(xscale="log", xlabel="training labels", ylabel="labeler's score after PPO", title=e)
        ax.set_xticks(list(LABEL_COUNTS), [str(n) for n in LABEL_COUNTS])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kl(results: Results, experiments: list[str], path: Path, scales: dict[str, float]) -> None:
    """Gains over the initial policy in units of the initial policy's spread, so that the labeler's
    score and the reward model's (normalized to std 1 there) share an axis. A second row of panels
    for the sweep on the saturating labeler's reward model, once any of it has finished."""
    distinct_rows = [True] if any(c.distinct for c in results) else []
    plt, fig, axes = figure(len(experiments) * (1 + len(distinct_rows)), rows=1 + len(distinct_rows))
    panels = [(e, distinct) for distinct in [False, *distinct_rows] for e in experiments]
    for ax, (e, distinct) in zip(axes, panels):
        labeler = e.removeprefix("mock_")
        per = [of(results, e, kind) for kind, _ in sweep_kinds(distinct)]
        xs = [statistics.mean([m["kl"] for m in ms]) if ms else None for ms in per]
        have = [(x, ms) for x, ms in zip(xs, per) if ms]
        counting = (lambda m: (m["score"] - m["score_before"]) / scales[labeler], "counting labeler's score", "C0")
        saturating = (lambda m: (m["score_distinct"] - m["score_before_distinct"]) / scales[f"{labeler}_distinct"],
                      "distinct-word score (saturating)", "C2")
        proxy = (lambda m: m["proxy_rm_after"] - m["proxy_rm_before"] if "proxy_rm_after" in m else None,
                 "its 2,048-label reward model's score (proxy)", "C1")
        true, other = (saturating, counting) if distinct else (counting, saturating)
        gains: list[tuple[Callable[[dict], float | None], str, str]] = [
            (true[0], true[1].replace(" (saturating)", "") + " (true)", true[2]), proxy, other]
        for gain, label, color in gains:
            points = [(x, [(m["kl"], gain(m)) for m in ms if gain(m) is not None]) for x, ms in have]
            points = [(x, ps) for x, ps in points if ps]
            band(ax, [x for x, _ in points], [[g for _, g in ps] for _, ps in points], label, color)
            for _, ps in points:
                ax.scatter([k for k, _ in ps], [g for _, g in ps], color=color, s=8, alpha=0.6)
        ax.set(xscale="log", xlabel="final KL from the initial policy (nats)",
               ylabel="gain over the initial policy (its std = 1)",
               title=f"{e}, {'saturating' if distinct else 'counting'} labeler's labels\n"
                     f"KL targets {', '.join(t for _, t in sweep_kinds(distinct))}")
        ticks = [t for t in (1, 2, 3, 5, 10, 20, 50, 100, 200) if have and min(x for x, _ in have) / 2 <= t
                 <= max(x for x, _ in have) * 2]
        ax.minorticks_off()
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_online(results: Results, experiments: list[str], path: Path) -> None:
    """Per experiment, the labeler's score against the final KL of each mode (mean, min–max over
    seeds; the band is the offline runs' final KL ± 10%); then KL and kl_coef during PPO (first seed)."""
    plt, fig, axes = figure(len(experiments) + 2, rows=2)
    colors = ["C0", "C1", "C4", "C2", "C5", "C3"]
    labels = [t.replace("`", "") for _, t in ONLINE_KINDS]
    for ax, e in zip(axes, experiments):
        per = [of(results, e, kind) for kind, _ in ONLINE_KINDS]
        errorbars(ax, [[m["kl"] for m in ms] for ms in per], [[m["score"] for m in ms] for ms in per], labels, colors)
        if per[0]:
            offline = statistics.mean(m["kl"] for m in per[0])
            ax.axvspan(offline * 0.9, offline * 1.1, color="grey", alpha=0.15, label="offline final KL ± 10%")
        ax.set(xlabel="final KL (nats)", ylabel="labeler's score after PPO", title=e)
        ax.legend(fontsize=7)
    for ax, key, ylabel, title in ((axes[-2], "kl_history", "KL of the update's batch", "KL"),
                                   (axes[-1], "kl_coef_history", "kl_coef", "kl_coef")):
        for (kind, _), label, color in zip(ONLINE_KINDS, labels, colors):
            for e, style in zip(experiments, ("-", "--")):
                for m in of(results, e, kind)[:1]:
                    ax.plot(range(len(m[key])), m[key], style, color=color, alpha=0.8,
                            label=f"{label}, {e.removeprefix('mock_')}")
        ax.set(xlabel="PPO update", ylabel=ylabel, title=f"{title} during PPO (first seed)")
        ax.legend(fontsize=6)
    axes[-2].axhline(TARGET, color="grey", linestyle=":")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
