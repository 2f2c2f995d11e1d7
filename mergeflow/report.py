"""The run's report from its scores: the comparison on the report split (kept apart by
kind), and the tables and markdown that Prefect artifacts and the terminal show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergeflow.evaluation import summarize
from mergeflow.selection import GridPoint

KINDS = ("data-free", "data-aware", "per-task", "reference")


def compare(
    kinds: Mapping[str, str],
    scores: Mapping[str, Mapping[str, float]],
    adaptations: Mapping[str, dict] | None = None,
) -> dict[str, dict]:
    """Label → summary on the report split against the fine-tuned models (NaN normalized
    accuracy without them), with its ``kind`` (data-free, data-aware, per-task, reference)
    and, for a data-aware entry, what it learned (``adaptation``)."""
    unknown = sorted(set(kinds.values()) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown report kind {unknown[0]!r}")
    tasks = next(iter(scores.values())).keys() if scores else ()
    reference = scores.get("finetuned") or {t: math.nan for t in tasks}
    comparison = {}
    for label, accuracy in scores.items():
        summary = summarize(accuracy, reference)
        summary["kind"] = kinds[label]
        if adaptations and label in adaptations:
            summary["adaptation"] = adaptations[label]
        comparison[label] = summary
    return comparison


def artifact_key(name: str) -> str:
    """``name`` as a Prefect artifact key (lower case, letters, digits and dashes)."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def grid_rows(points: Sequence[GridPoint]) -> list[dict]:
    return [
        {
            "candidate": p.candidate.label,
            "mean_accuracy": round(p.summary["mean_accuracy"], 4),
            "mean_normalized": round(p.summary["mean_normalized"], 4),
        }
        for p in points
    ]


def comparison_rows(comparison: Mapping[str, dict]) -> list[dict]:
    return [
        {
            "method": name,
            **{t: round(a, 4) for t, a in s["accuracy"].items()},
            "mean": round(s["mean_accuracy"], 4),
        }
        for name, s in comparison.items()
    ]


def storage_line(compression: Mapping | None, num_tasks: int) -> str:
    """What the CART index costs against the checkpoints, or nothing without one."""
    if compression is None:
        return ""
    return (
        f"CART index ({compression['label']}): {compression['index_bytes'] / 2**20:.1f} MiB "
        f"for {num_tasks} tasks, {compression['ratio']:.3f} of the fine-tuned checkpoints' "
        f"{compression['checkpoint_bytes'] / 2**20:.1f} MiB"
    )


def splits_line(sizes: Mapping[str, Mapping[str, int]]) -> str:
    """``{task: {split: images}}`` in one line: each split's images per task (a range where
    the tasks differ)."""
    splits: dict[str, set[int]] = {}
    for per_task in sizes.values():
        for split, count in per_task.items():
            splits.setdefault(split, set()).add(count)
    spans = {s: f"{min(n)}" if len(n) == 1 else f"{min(n)}-{max(n)}" for s, n in splits.items()}
    return f"{len(sizes)} tasks; images per task: " + ", ".join(
        f"{split} {span}" for split, span in spans.items()
    )


def registration_line(registration: Mapping) -> str:
    """``models:/NAME/VERSION (aliases)``, and whether the run made that version."""
    aliases = ", ".join(registration["aliases"]) or "no alias"
    again = "; already registered, no new version" if registration.get("reused") else ""
    return f"models:/{registration['name']}/{registration['version']} ({aliases}{again})"


def markdown(
    name: str,
    tasks: Sequence[str],
    winner: str,
    registration: Mapping,
    comparison: Mapping[str, dict],
    charts: Mapping[str, str],
    storage: str = "",
) -> str:
    """The report as markdown: the registered version, the table (best first), the charts
    (linked under the run's artifacts) and the MLflow run."""
    reused = ", already registered: no new version" if registration.get("reused") else ""
    lines = [
        f"# {name}",
        "",
        f"**Version {registration['version']}** ({', '.join(registration['aliases'])}"
        f"{reused}): {winner}, report mean accuracy "
        f"{comparison[winner]['mean_accuracy']:.4f}" + (f"\n\n{storage}" if storage else ""),
        "",
        "| model | kind | " + " | ".join(tasks) + " | mean |",
        "|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for label, summary in sorted(comparison.items(), key=lambda kv: -kv[1]["mean_accuracy"]):
        cells = [f"{100 * summary['accuracy'][t]:.1f}" for t in tasks]
        lines.append(
            f"| {label} | {summary['kind']} | "
            + " | ".join(cells)
            + f" | {100 * summary['mean_accuracy']:.1f} |"
        )
    lines += ["", "Charts, logged to MLflow with the run:", ""]
    base = registration.get("artifact_uri", "")
    for artifact_path in charts:
        link = f"{base}/{artifact_path}" if base else artifact_path
        lines.append(f"- [{Path(artifact_path).stem.replace('_', ' ')}]({link})")
    if registration.get("run_url"):
        lines += ["", f"MLflow run: {registration['run_url']}"]
    return "\n".join(lines)
