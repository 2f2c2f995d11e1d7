"""The merge pipeline: checkpoints → CART rank grid (and other method families) → per-task
scores → MLflow registry.

mergeflow run SPEC.yaml            (or deploy it: prefect.yaml, deployment merge-pipeline)
"""

from __future__ import annotations

import math
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mergeflow.evaluation import REPORT, SELECTION, summarize
from mergeflow.pipeline import is_data_aware, is_per_task
from mergeflow.spec import MergeSpec
from tasks.checkpoints import fetch_checkpoint
from tasks.pipeline import (
    compress_checkpoints,
    evaluate_grid_point,
    factorize_checkpoints,
    prepare_evaluation,
    read_adaptation,
    register_index,
    register_winner,
    score_candidate,
    score_index,
)


def _pick_best(grid: list[dict]) -> dict:
    """The grid point with the best mean normalized accuracy; ties go to CART, then the lower
    rank, then the smaller scale (cheaper to store, closer to averaging)."""

    def preference(point: dict):
        params = point["params"]
        return (
            point["mean_normalized"],
            point["method"] == "cart",
            -params.get("rank_ratio", 0.0),
            -params.get("scale", 0.0),
        )

    return max(grid, key=preference)


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def cart_candidate(rank_ratio: float, scale: float) -> dict:
    return {
        "method": "cart",
        "params": {"rank_ratio": rank_ratio, "scale": scale},
        "label": f"cart rank_ratio={rank_ratio} scale={scale}",
    }


@flow(name="merge-pipeline", log_prints=True)
def merge_pipeline(spec: MergeSpec, cache_dir: str | None = None) -> dict:
    """Merge the spec's fine-tuned checkpoints with CART over its rank grid (and any other
    method families it lists), score every point on each task's selection split, compare
    the best with the baselines on the report split, and register it in MLflow."""
    logger = get_run_logger()
    started = time.perf_counter()
    uris = [spec.base] + [t.checkpoint for t in spec.tasks]
    fetched = [fetch_checkpoint.submit(uri, cache_dir) for uri in uris]
    lineage = {}
    for uri, future in zip(uris, fetched, strict=True):
        info = future.result()
        role = (
            "base" if uri == spec.base else next(t.name for t in spec.tasks if t.checkpoint == uri)
        )
        lineage[f"source.{role}.uri"] = uri
        lineage[f"source.{role}.sha256"] = info["sha256"]
    sizes = prepare_evaluation(spec, cache_dir)
    logger.info("evaluation data ready: %s", sizes)

    finetuned = {"method": "finetuned", "params": {}, "label": "finetuned"}
    finetuned_selection = score_candidate(spec, finetuned, SELECTION, cache_dir=cache_dir)

    factors_path = factorize_checkpoints(spec, cache_dir)
    families = {"cart": [cart_candidate(r, s) for r, s in spec.grid.points()]}
    for family in spec.grid.families:
        name = family.label or family.method
        if name in families:
            name = f"{name} {len(families)}"
        families[name] = [point.candidate() for point in family.points()]
    candidates = [{**c, "family": name} for name, points in families.items() for c in points]
    grid = []
    for i, candidate in enumerate(candidates, start=1):
        if candidate["method"] == "cart":
            params = candidate["params"]
            scores = evaluate_grid_point(
                spec, factors_path, params["rank_ratio"], params["scale"], cache_dir
            )
        else:
            scores = score_candidate(spec, candidate, SELECTION, factors_path, cache_dir)
        summary = summarize(scores, finetuned_selection)
        grid.append({**candidate, **candidate["params"], **summary})
        print(
            f"grid {i}/{len(candidates)}: {candidate['label']} "
            f"mean acc {summary['mean_accuracy']:.3f} normalized {summary['mean_normalized']:.3f}"
        )
    # each family's best point on the selection splits goes to the report; the best of those
    # that are one merged model is registered
    family_best = {name: _pick_best([p for p in grid if p["family"] == name]) for name in families}
    mergeable = [p for p in family_best.values() if not is_per_task(p["method"])]
    best = _pick_best(mergeable)
    winner = {k: best[k] for k in ("method", "params", "label")}
    print(f"selected {winner['label']}")

    # the report split: each family's best point, the baselines, the references
    report = {
        p["label"]: {k: p[k] for k in ("method", "params", "label")} for p in family_best.values()
    }
    report.update({b.name: b.candidate() for b in spec.baseline_methods()})
    report_scores = {}
    for name in ("finetuned", "zeroshot"):
        if spec.has_reference(name):
            reference_candidate = {"method": name, "params": {}, "label": name}
            report_scores[name] = score_candidate(
                spec, reference_candidate, REPORT, cache_dir=cache_dir
            )
    for name, candidate in report.items():
        report_scores[name] = score_candidate(spec, candidate, REPORT, factors_path, cache_dir)
    compression = None
    if spec.compression is not None:
        compression = compress_checkpoints(spec, cache_dir)
        settings = spec.compression.model_dump(exclude={"register_model"}, exclude_none=True)
        label = "cart_indexed " + " ".join(f"{k}={v}" for k, v in settings.items())
        compression["label"] = label
        report[label] = {"method": "cart_indexed", "params": settings, "label": label}
        report_scores[label] = score_index(spec, compression["path"], REPORT, cache_dir)
    reference = report_scores.get("finetuned") or {t.name: math.nan for t in spec.tasks}
    comparison = {name: summarize(scores, reference) for name, scores in report_scores.items()}
    # the report keeps data-free merges, data-aware ones and the references apart
    for name, summary in comparison.items():
        if name not in report:
            summary["kind"] = "reference"
        elif is_data_aware(report[name]["method"]):
            summary["kind"] = "data-aware"
            summary["adaptation"] = read_adaptation(spec, report[name], cache_dir)
        elif is_per_task(report[name]["method"]):
            summary["kind"] = "per-task"  # one model per task: compression, not a merge
        else:
            summary["kind"] = "data-free"

    registration = register_winner(spec, factors_path, winner, grid, comparison, lineage, cache_dir)
    if compression is not None and spec.compression.register_model:
        compression["registration"] = register_index(
            spec, compression, comparison[compression["label"]], lineage, cache_dir
        )

    key = _artifact_key(spec.registered_model)
    create_table_artifact(
        key=f"{key}-grid",
        table=[
            {
                "candidate": p["label"],
                "mean_accuracy": round(p["mean_accuracy"], 4),
                "mean_normalized": round(p["mean_normalized"], 4),
            }
            for p in grid
        ],
        description=f"Grid on the selection splits of {spec.registered_model}",
    )
    rows = [
        {
            "method": name,
            **{t: round(s["accuracy"][t], 4) for t in s["accuracy"]},
            "mean": round(s["mean_accuracy"], 4),
        }
        for name, s in comparison.items()
    ]
    create_table_artifact(
        key=f"{key}-comparison",
        table=rows,
        description="Report-split accuracy per task and method",
    )
    storage = ""
    if compression is not None:
        storage = (
            f"\n\nCART index ({compression['label']}): "
            f"{compression['index_bytes'] / 2**20:.1f} MiB for {len(spec.tasks)} tasks, "
            f"{compression['ratio']:.3f} of the fine-tuned checkpoints' "
            f"{compression['checkpoint_bytes'] / 2**20:.1f} MiB"
        )
    create_markdown_artifact(
        key=f"{key}-registration",
        markdown=(
            f"**{spec.registered_model}** version {registration['version']} "
            f"({', '.join(registration['aliases'])}): {winner['label']}, report mean accuracy "
            f"{comparison[winner['label']]['mean_accuracy']:.4f}{storage}"
        ),
    )
    return {
        "best": winner,
        "family_best": {name: p["label"] for name, p in family_best.items()},
        "grid": grid,
        "comparison": comparison,
        "compression": compression,
        "registration": registration,
        "seconds": time.perf_counter() - started,
    }


def run_from_cli(spec_path: str, cache_dir: str | None = None) -> dict:
    """Entry point for ``mergeflow run``: validate the spec file, then run the flow."""
    spec = MergeSpec.from_yaml(spec_path)
    return merge_pipeline(spec, cache_dir)
