"""The merge pipeline: checkpoints → CART rank grid → per-task scores → MLflow registry.

mergeflow run SPEC.yaml            (or deploy it: prefect.yaml, deployment merge-pipeline)
"""

from __future__ import annotations

import math
import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mergeflow.evaluation import REPORT, SELECTION, summarize
from mergeflow.spec import MergeSpec
from tasks.checkpoints import fetch_checkpoint
from tasks.pipeline import (
    evaluate_grid_point,
    factorize_checkpoints,
    prepare_evaluation,
    register_winner,
    score_candidate,
)


def _pick_best(grid: list[dict]) -> dict:
    """The grid point with the best mean normalized accuracy; ties go to the lower rank, then
    the smaller scale (cheaper to store, closer to averaging)."""
    return max(grid, key=lambda p: (p["mean_normalized"], -p["rank_ratio"], -p["scale"]))


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


@flow(name="merge-pipeline", log_prints=True)
def merge_pipeline(spec: MergeSpec, cache_dir: str | None = None) -> dict:
    """Merge the spec's fine-tuned checkpoints with CART over its rank grid, score every
    point on each task's selection split, compare the best with the baselines on the report
    split, and register it in MLflow."""
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

    finetuned_selection = {}
    for t in spec.tasks:
        finetuned_selection[t.name] = score_candidate(
            spec, f"finetuned:{t.name}", SELECTION, cache_dir=cache_dir
        )[t.name]

    factors_path = factorize_checkpoints(spec, cache_dir)
    grid = []
    points = spec.grid.points()
    for i, (rank_ratio, scale) in enumerate(points, start=1):
        scores = evaluate_grid_point(spec, factors_path, rank_ratio, scale, cache_dir)
        summary = summarize(scores, finetuned_selection)
        grid.append({"rank_ratio": rank_ratio, "scale": scale, **summary})
        print(
            f"grid {i}/{len(points)}: rank={rank_ratio} scale={scale} "
            f"mean acc {summary['mean_accuracy']:.3f} normalized {summary['mean_normalized']:.3f}"
        )
    best = _pick_best(grid)
    print(f"selected rank_ratio={best['rank_ratio']} scale={best['scale']}")

    finetuned_report = {}
    report_scores = {}
    for t in spec.tasks:
        if "finetuned" in spec.baselines:
            report_scores[f"finetuned:{t.name}"] = score_candidate(
                spec, f"finetuned:{t.name}", REPORT, cache_dir=cache_dir
            )
            finetuned_report[t.name] = report_scores[f"finetuned:{t.name}"][t.name]
    report_scores["cart"] = score_candidate(
        spec, "cart", REPORT, factors_path, best["rank_ratio"], best["scale"], cache_dir
    )
    for baseline in spec.baselines:
        if baseline != "finetuned":
            report_scores[baseline] = score_candidate(spec, baseline, REPORT, cache_dir=cache_dir)
    reference = finetuned_report or {t.name: math.nan for t in spec.tasks}
    comparison = {
        name: summarize(scores, reference)
        for name, scores in report_scores.items()
        if not name.startswith("finetuned:")
    }
    if finetuned_report:
        comparison["finetuned"] = summarize(finetuned_report, finetuned_report)

    registration = register_winner(spec, factors_path, best, grid, comparison, lineage, cache_dir)

    key = _artifact_key(spec.registered_model)
    create_table_artifact(
        key=f"{key}-grid",
        table=[
            {
                "rank_ratio": p["rank_ratio"],
                "scale": p["scale"],
                "mean_accuracy": round(p["mean_accuracy"], 4),
                "mean_normalized": round(p["mean_normalized"], 4),
            }
            for p in grid
        ],
        description=f"CART grid on the selection splits of {spec.registered_model}",
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
    create_markdown_artifact(
        key=f"{key}-registration",
        markdown=(
            f"**{spec.registered_model}** version {registration['version']} "
            f"({', '.join(registration['aliases'])}): CART rank_ratio={best['rank_ratio']}, "
            f"scale={best['scale']}, report mean accuracy "
            f"{comparison['cart']['mean_accuracy']:.4f}"
        ),
    )
    return {
        "best": {"rank_ratio": best["rank_ratio"], "scale": best["scale"]},
        "grid": grid,
        "comparison": comparison,
        "registration": registration,
        "seconds": time.perf_counter() - started,
    }


def run_from_cli(spec_path: str, cache_dir: str | None = None) -> dict:
    """Entry point for ``mergeflow run``: validate the spec file, then run the flow."""
    spec = MergeSpec.from_yaml(spec_path)
    return merge_pipeline(spec, cache_dir)
