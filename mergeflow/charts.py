"""Figures of a pipeline run, as PNG files: accuracy against rank per scale; every compared
model's per-task accuracy as one heatmap (models × tasks, best mean first); and, for the best
model of each kind beside the references, per-task bars and a radar like the paper's.

Every figure stays under :data:`MAX_WIDTH_PX` wide however many models a spec compares.
Drawn with matplotlib's Agg backend, so they need no display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_rank(grid: Sequence[Mapping], path: str | Path) -> Path:
    """Mean accuracy (first panel) and each task's accuracy against CART's rank ratio, one
    line per scale, on the selection splits. ``grid``: the pipeline's grid entries (CART
    points carry ``rank_ratio``, ``scale`` and per-task ``accuracy``)."""
    plt = _pyplot()
    cart = [p for p in grid if p["method"] == "cart"]
    if not cart:
        raise ValueError("the grid has no CART points to plot against rank")
    tasks = list(cart[0]["accuracy"])
    scales = sorted({p["scale"] for p in cart})
    panels = ["mean", *tasks]
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False, sharex=True
    )
    for ax, panel in zip(axes.flat, panels, strict=False):
        for scale in scales:
            points = sorted((p for p in cart if p["scale"] == scale), key=lambda p: p["rank_ratio"])
            x = [p["rank_ratio"] for p in points]
            if panel == "mean":
                y = [100 * p["mean_accuracy"] for p in points]
            else:
                y = [100 * p["accuracy"][panel] for p in points]
            ax.plot(x, y, marker="o", label=f"λ = {scale:g}")
        ax.set_title("mean over tasks" if panel == "mean" else panel)
        ax.set_xlabel("rank ratio")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    figure.suptitle("CART: selection-split accuracy against rank")
    figure.tight_layout()
    return _save(plt, figure, path)


def accuracy_after_arrivals(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Mean normalized accuracy on the tasks seen so far against the number of arrivals,
    one line per continual method. ``rows``: ``{method, arrivals, mean_normalized}``."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6.0, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["arrivals"])
        ax.plot([r["arrivals"] for r in points], [100 * r["mean_normalized"] for r in points],
                marker="o", label=method)  # fmt: skip
    ax.set_xlabel("checkpoints arrived (tasks seen)")
    ax.set_ylabel("normalized accuracy, tasks seen (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("continual merging: accuracy after each arrival")
    figure.tight_layout()
    return _save(plt, figure, path)


DPI = 110
MAX_WIDTH_PX = 2000
# labels longer than this are cut (with an ellipsis) so the figure keeps its width
LABEL_CHARS = 42


def _short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


def best_of_each_kind(comparison: Mapping[str, Mapping]) -> dict[str, Mapping]:
    """The best entry (by mean accuracy) of each kind but ``reference``, then every
    reference (the fine-tuned models, the zero-shot base): what bars and a radar can show
    legibly. Entries without a ``kind`` count as one kind."""
    best: dict[str, tuple[str, Mapping]] = {}
    references = {}
    for label, summary in comparison.items():
        kind = summary.get("kind", "merged")
        if kind == "reference":
            references[label] = summary
        elif kind not in best or summary["mean_accuracy"] > best[kind][1]["mean_accuracy"]:
            best[kind] = (label, summary)
    chosen = {label: summary for label, summary in best.values()}
    return {**dict(sorted(chosen.items(), key=lambda kv: -kv[1]["mean_accuracy"])), **references}


def per_task_heatmap(comparison: Mapping[str, Mapping], path: str | Path) -> Path:
    """Every compared model's report-split accuracy per task and its mean, one row per
    model (best mean first), each cell coloured and labelled with its accuracy (%)."""
    plt = _pyplot()
    rows = sorted(comparison.items(), key=lambda kv: -kv[1]["mean_accuracy"])
    tasks = list(rows[0][1]["accuracy"])
    columns = [*tasks, "mean"]
    values = [[100 * s["accuracy"][t] for t in tasks] + [100 * s["mean_accuracy"]] for _, s in rows]
    width = min(1.8 + 0.75 * len(columns), (MAX_WIDTH_PX - 500) / DPI)
    figure, ax = plt.subplots(figsize=(width, 1.2 + 0.32 * len(rows)))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(
                j,
                i,
                f"{value:.0f}",
                ha="center",
                va="center",
                fontsize="x-small",
                color="black" if value > 60 else "white",
            )
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    labels = [f"{_short(label)} ({s.get('kind', '')})".replace(" ()", "") for label, s in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize="small")
    ax.axvline(len(tasks) - 0.5, color="white", linewidth=2)
    figure.colorbar(image, ax=ax, label="accuracy (%)", fraction=0.05)
    ax.set_title("Report-split accuracy per task, every compared model")
    figure.tight_layout()
    return _save(plt, figure, path)


def per_task_bars(comparison: Mapping[str, Mapping], path: str | Path) -> Path:
    """Grouped bars: report-split accuracy per task (and the mean) of the best model of
    each kind and the references (:func:`best_of_each_kind`). ``comparison``: label →
    summary with ``accuracy`` (per task), ``mean_accuracy`` and ``kind``, and where given
    their 95% intervals (``interval``, ``mean_interval``), drawn as error bars."""
    plt = _pyplot()
    comparison = best_of_each_kind(comparison)
    labels = list(comparison)
    tasks = list(next(iter(comparison.values()))["accuracy"])
    groups = [*tasks, "mean"]
    width = 0.8 / len(labels)
    wide = max(7.0, len(groups) * (0.6 + 0.22 * len(labels)))
    figure, ax = plt.subplots(figsize=(min(wide, (MAX_WIDTH_PX - 500) / DPI), 4.5))
    for i, label in enumerate(labels):
        summary = comparison[label]
        values = [100 * summary["accuracy"][t] for t in tasks] + [100 * summary["mean_accuracy"]]
        ax.bar(
            [g + (i - (len(labels) - 1) / 2) * width for g in range(len(groups))],
            values,
            width,
            label=_short(label),
            yerr=_error_bars(summary, tasks, values),
            error_kw={"elinewidth": 0.7, "capsize": 1.5, "ecolor": "0.25"},
        )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Report-split accuracy per task")
    figure.tight_layout()
    return _save(plt, figure, path)


def _error_bars(summary: Mapping, tasks: Sequence[str], values: Sequence[float]):
    """The 95% intervals of a summary (per task, then the mean) as matplotlib's (2, N)
    distances below and above each bar, or None when the summary has none."""
    if "interval" not in summary or "mean_interval" not in summary:
        return None
    bounds = [summary["interval"][t] for t in tasks] + [summary["mean_interval"]]
    below = [v - 100 * low for v, (low, _) in zip(values, bounds, strict=True)]
    above = [100 * high - v for v, (_, high) in zip(values, bounds, strict=True)]
    return [[max(0.0, b) for b in below], [max(0.0, a) for a in above]]


def per_task_radar(comparison: Mapping[str, Mapping], path: str | Path) -> Path:
    """A radar of report-split accuracy per task, one polygon per model of
    :func:`best_of_each_kind` (needs at least three tasks to be a polygon)."""
    plt = _pyplot()
    comparison = best_of_each_kind(comparison)
    tasks = list(next(iter(comparison.values()))["accuracy"])
    angles = [2 * math.pi * i / len(tasks) for i in range(len(tasks))]
    figure, ax = plt.subplots(figsize=(6.5, 6), subplot_kw={"projection": "polar"})
    for label, summary in comparison.items():
        values = [100 * summary["accuracy"][t] for t in tasks]
        ax.plot([*angles, angles[0]], [*values, values[0]], label=_short(label), linewidth=1.2)
    ax.set_xticks(angles, tasks)
    ax.set_ylim(0, 100)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.05, 1.05))
    ax.set_title("Report-split accuracy per task")
    figure.tight_layout()
    return _save(plt, figure, path)


def _save(plt, figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path
