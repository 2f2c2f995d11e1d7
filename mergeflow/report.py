"""The run's report from its scores: the comparison on the report split (kept apart by
kind), and the tables and markdown that Prefect artifacts and the terminal show.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergeflow import stats
from mergeflow.evaluation import summarize
from mergeflow.selection import GridPoint

KINDS = ("data-free", "data-aware", "routed", "per-task", "reference")


def compare(
    kinds: Mapping[str, str],
    scores: Mapping[str, Mapping[str, float]],
    adaptations: Mapping[str, dict] | None = None,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, dict]:
    """Label → summary on the report split against the fine-tuned models (NaN normalized
    accuracy without them), with its ``kind`` (data-free, data-aware, per-task, reference),
    for a data-aware entry what it learned (``adaptation``) and, given the images per task
    (``sizes``), 95% intervals: Wilson's per task (``interval``), and of the mean over
    tasks (``mean_interval``)."""
    unknown = sorted(set(kinds.values()) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown report kind {unknown[0]!r}")
    tasks = next(iter(scores.values())).keys() if scores else ()
    reference = scores.get("finetuned") or {t: math.nan for t in tasks}
    comparison = {}
    for label, accuracy in scores.items():
        summary = summarize(accuracy, reference)
        summary["kind"] = kinds[label]
        if sizes is not None:
            summary["interval"] = {
                t: list(stats.wilson(round(a * sizes[t]), sizes[t])) for t, a in accuracy.items()
            }
            summary["mean_interval"] = list(stats.mean_interval(accuracy, sizes))
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
        "| model | kind | " + " | ".join(tasks) + " | mean (95% interval) |",
        "|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for label, summary in sorted(comparison.items(), key=lambda kv: -kv[1]["mean_accuracy"]):
        cells = [f"{100 * summary['accuracy'][t]:.1f}" for t in tasks]
        mean = f"{100 * summary['mean_accuracy']:.1f}"
        if "mean_interval" in summary:
            low, high = summary["mean_interval"]
            mean += f" ({100 * low:.1f}–{100 * high:.1f})"
        lines.append(f"| {label} | {summary['kind']} | " + " | ".join(cells) + f" | {mean} |")
    lines += ["", "Charts, logged to MLflow with the run:", ""]
    base = registration.get("artifact_uri", "")
    for artifact_path in charts:
        link = f"{base}/{artifact_path}" if base else artifact_path
        lines.append(f"- [{Path(artifact_path).stem.replace('_', ' ')}]({link})")
    if registration.get("run_url"):
        lines += ["", f"MLflow run: {registration['run_url']}"]
    return "\n".join(lines)


def table(comparison: Mapping[str, dict], tasks: Sequence[str]) -> str:
    """Report accuracy (%) per task and mean, with the mean's 95% interval where known: the
    references, data-free merges, data-aware merges, routed models and per-task models
    (compression) apart, each group sorted by mean accuracy."""
    label = max(17, *(len(n) + 1 for n in comparison))
    width = max(7, *(len(t) for t in tasks))
    header = f"{'method':{label}s}" + "".join(f"{t[:width]:>{width + 1}s}" for t in tasks)
    lines = [header + "   mean  95% interval"]
    for kind in ("reference", "data-free", "data-aware", "routed", "per-task"):
        names = sorted(
            (n for n, s in comparison.items() if s.get("kind", "data-free") == kind),
            key=lambda n: comparison[n]["mean_accuracy"],
        )
        if names:
            lines.append(f"-- {kind}")
        for name in names:
            summary = comparison[name]
            cells = "".join(f"{100 * summary['accuracy'][t]:>{width + 1}.1f}" for t in tasks)
            line = f"{name:{label}s}{cells}{100 * summary['mean_accuracy']:>7.1f}"
            if "mean_interval" in summary:
                low, high = summary["mean_interval"]
                line += f"  {100 * low:.1f}-{100 * high:.1f}"
            lines.append(line)
    return "\n".join(lines)


def adaptation_lines(comparison: Mapping[str, dict]) -> list[str]:
    """What each data-aware merge's adaptation did: entropy (and objective) before → after,
    and the share of samples it used."""
    lines = []
    for name, summary in comparison.items():
        info = summary.get("adaptation") or {}
        if "entropy_before" in info:
            kept = info.get("samples_kept", {})
            share = sum(kept.values()) / len(kept) if kept else 1.0
            line = (
                f"  {name}: mean entropy {info['entropy_before']:.3f} -> "
                f"{info['entropy_after']:.3f}"
            )
            if info.get("diversity"):
                line += (
                    f", objective {info['objective_before']:.3f} -> {info['objective_after']:.3f}"
                )
            lines.append(f"{line}, samples used {100 * share:.0f}%")
    return lines


def routed_lines(comparison: Mapping[str, dict]) -> list[str]:
    """Each routed model (Twin-Merging): how often its router names an image's task, and
    its storage against the fine-tuned checkpoints."""
    lines = []
    for name, summary in comparison.items():
        info = summary.get("adaptation") or {}
        if "router_held_out_accuracy" not in info:
            continue
        routed = info["router_held_out_accuracy"]
        which = "held-out" if routed is not None else "training"
        routed = routed if routed is not None else info["router_train_accuracy"]
        line = f"{name}: the router names the task of {100 * routed:.0f}% of {which} images"
        if info.get("checkpoint_bytes"):
            line += (
                f"; stored in {info['stored_bytes'] / 2**20:.1f} MiB, "
                f"{info['stored_bytes'] / info['checkpoint_bytes']:.2f} of the fine-tuned "
                "checkpoints'"
            )
        lines.append(line)
    return lines


def text(result: Mapping) -> str:
    """The run's answer as the terminal shows it (``mergeflow run``, ``make demo``): the
    table, the choice and why, warnings, adaptations, the CART index, what the result store
    gave back and what was computed, the registration, the charts, the stores."""
    comparison = result["comparison"]
    tasks = list(next(iter(comparison.values()))["accuracy"]) if comparison else []
    lines = ["Report-split accuracy (%) per task and method", table(comparison, tasks), ""]
    chosen = result.get("selection") or {}
    lines.append(f"chosen: {chosen.get('why') or result['best']['label']}")
    average = chosen.get("versus_average")
    if average:
        low, high = average["interval"]
        lines.append(
            f"  against {average['other']}: {100 * average['difference']:+.1f} points of mean "
            f"normalized accuracy (95% interval {100 * low:+.1f} to {100 * high:+.1f})"
        )
    for warning in chosen.get("warnings", []):
        lines.append(f"warning: {warning}")
    if chosen.get("other_edges"):
        lines.append("at an edge of their search: " + "; ".join(chosen["other_edges"]))
    adaptation = adaptation_lines(comparison)
    if adaptation:
        lines += ["test-time adaptation (coefficients are in MLflow, results.json):", *adaptation]
    lines += [f"routed: {line}" for line in routed_lines(comparison)]
    compression = result.get("compression")
    if compression:
        lines.append(storage_line(compression, len(tasks)))
    usage = result.get("store_usage")
    if usage:
        lines.append(usage_line(usage))
    registration = result["registration"]
    lines.append(f"registered: {registration_line(registration)}")
    if compression and compression.get("registration"):
        lines.append(f"registered the index: {registration_line(compression['registration'])}")
    routed = result.get("routed")
    if routed:
        lines.append(f"registered {routed['label']}: {registration_line(routed['registration'])}")
    if result.get("charts"):
        lines.append("charts:")
        lines += [f"  {path}" for path in result["charts"].values()]
    if registration.get("run_url") or registration.get("run_id"):
        lines.append(f"MLflow run: {registration.get('run_url') or registration['run_id']}")
    if result.get("stores"):
        lines.append(stores_line(result["stores"]))
    return "\n".join(lines)


def usage_line(usage: Mapping[str, Mapping[str, int]]) -> str:
    """``{kind: {reused, computed}}`` in one line."""
    reused = ", ".join(f"{u['reused']} {k}" for k, u in usage.items() if u.get("reused"))
    computed = ", ".join(f"{u['computed']} {k}" for k, u in usage.items() if u.get("computed"))
    return f"result store: reused {reused or 'nothing'}; computed {computed or 'nothing'}"


def stores_line(stores: Mapping[str, str]) -> str:
    """Where the run's stores are (a :meth:`mergeflow.stores.Stores.record`), in one line."""
    from mergeflow.stores import Stores

    return Stores(**stores).line()


def json_document(result: Mapping) -> str:
    """The run's result as one JSON document (``mergeflow run --json``): NaN as null."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(result), indent=2, default=str)
