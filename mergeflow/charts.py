"""Figures of a pipeline run, as PNG files: accuracy against rank per scale, and per-task
accuracy of the compared methods (bars and a radar, like the paper's figures).

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


def per_task_bars(comparison: Mapping[str, Mapping], path: str | Path) -> Path:
    """Grouped bars: report-split accuracy per task (and the mean) for each compared model.
    ``comparison``: label → summary with ``accuracy`` (per task) and ``mean_accuracy``."""
    plt = _pyplot()
    labels = list(comparison)
    tasks = list(next(iter(comparison.values()))["accuracy"])
    groups = [*tasks, "mean"]
    width = 0.8 / len(labels)
    figure, ax = plt.subplots(figsize=(max(7.0, len(groups) * (0.6 + 0.22 * len(labels))), 4.5))
    for i, label in enumerate(labels):
        summary = comparison[label]
        values = [100 * summary["accuracy"][t] for t in tasks] + [100 * summary["mean_accuracy"]]
        ax.bar(
            [g + (i - (len(labels) - 1) / 2) * width for g in range(len(groups))],
            values,
            width,
            label=label,
        )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Report-split accuracy per task")
    figure.tight_layout()
    return _save(plt, figure, path)


def per_task_radar(comparison: Mapping[str, Mapping], path: str | Path) -> Path:
    """A radar of report-split accuracy per task, one polygon per compared model (needs at
    least three tasks to be a polygon)."""
    plt = _pyplot()
    tasks = list(next(iter(comparison.values()))["accuracy"])
    angles = [2 * math.pi * i / len(tasks) for i in range(len(tasks))]
    figure, ax = plt.subplots(figsize=(6.5, 6), subplot_kw={"projection": "polar"})
    for label, summary in comparison.items():
        values = [100 * summary["accuracy"][t] for t in tasks]
        ax.plot([*angles, angles[0]], [*values, values[0]], label=label, linewidth=1.2)
    ax.set_xticks(angles, tasks)
    ax.set_ylim(0, 100)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.05, 1.05))
    ax.set_title("Report-split accuracy per task")
    figure.tight_layout()
    return _save(plt, figure, path)


def _save(plt, figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path
