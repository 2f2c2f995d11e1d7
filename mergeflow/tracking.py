"""Record a pipeline run in MLflow: the grid as nested runs, the comparison, the winner.

The tracking store comes from ``MLFLOW_TRACKING_URI`` (for example ``sqlite:///mlflow.db``
or ``http://mlflow.internal:5000``). Nothing secret is logged: parameters and tags hold the
method, its settings, URIs and digests only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

import mergeflow
from mergeflow.registry import register_merged_model
from mergeflow.spec import MergeSpec

SCORE_METRIC = "report_mean_normalized"


def _experiment_name(spec: MergeSpec) -> str:
    return f"mergeflow/{spec.registered_model}"


def _use_experiment(name: str) -> None:
    """Select (creating if needed) the experiment; ``MERGEFLOW_ARTIFACT_ROOT`` places a new
    experiment's artifacts (default: MLflow's own choice for the tracking store)."""
    import mlflow

    if mlflow.get_experiment_by_name(name) is None and os.environ.get("MERGEFLOW_ARTIFACT_ROOT"):
        root = os.environ["MERGEFLOW_ARTIFACT_ROOT"].rstrip("/")
        mlflow.create_experiment(name, artifact_location=f"{root}/{name.replace('/', '-')}")
    mlflow.set_experiment(name)


def record_run(
    spec: MergeSpec,
    weights: Mapping[str, torch.Tensor],
    heads: Mapping[str, torch.Tensor],
    classes: Mapping[str, tuple[str, ...]],
    best: dict,
    grid: list[dict],
    comparison: dict,
    lineage: Mapping[str, str],
) -> dict:
    """``grid``: one dict per point with rank_ratio, scale, accuracy (per task), mean_accuracy,
    mean_normalized. ``comparison``: candidate → summary on the report split."""
    import mlflow

    _use_experiment(_experiment_name(spec))
    cart = comparison["cart"]
    with mlflow.start_run(run_name=f"cart rank={best['rank_ratio']} scale={best['scale']}") as run:
        mlflow.set_tags({"mergeflow.spec": spec.model_dump_json()[:5000], **lineage})
        for i, point in enumerate(grid):
            with mlflow.start_run(
                run_name=f"grid rank={point['rank_ratio']} scale={point['scale']}", nested=True
            ):
                mlflow.log_params({"rank_ratio": point["rank_ratio"], "scale": point["scale"]})
                mlflow.log_metrics(
                    {
                        "selection_mean_accuracy": point["mean_accuracy"],
                        "selection_mean_normalized": point["mean_normalized"],
                        **{f"selection_accuracy.{t}": a for t, a in point["accuracy"].items()},
                    }
                )
            # the same figures as steps of the parent, so one chart shows them against rank
            mlflow.log_metric("grid_selection_mean_normalized", point["mean_normalized"], step=i)
        metrics = {
            SCORE_METRIC: cart["mean_normalized"],
            "report_mean_accuracy": cart["mean_accuracy"],
        }
        for task, acc in cart["accuracy"].items():
            metrics[f"report_accuracy.{task}"] = acc
            metrics[f"report_normalized.{task}"] = cart["normalized"][task]
        for candidate, summary in comparison.items():
            if candidate != "cart":
                name = candidate.replace(":", ".")
                metrics[f"baseline.{name}.report_mean_accuracy"] = summary["mean_accuracy"]
        mlflow.log_text(
            json.dumps({"grid": grid, "comparison": comparison}, indent=2), "results.json"
        )
        registration = register_merged_model(
            name=spec.registered_model,
            model_config=spec.model,
            weights=weights,
            heads=heads,
            classes=classes,
            score=cart["mean_normalized"],
            params={
                "method": "cart",
                "rank_ratio": best["rank_ratio"],
                "scale": best["scale"],
                "model": spec.model,
                "num_tasks": len(spec.tasks),
            },
            metrics=metrics,
            tags={
                **lineage,
                "mergeflow.version": mergeflow.__version__,
                "method": "cart",
                "rank_ratio": str(best["rank_ratio"]),
                "scale": str(best["scale"]),
            },
            run_id=run.info.run_id,
        )
    return {
        "name": registration.name,
        "version": registration.version,
        "aliases": list(registration.aliases),
        "previous_champion": registration.previous_champion,
        "run_id": registration.run_id,
        "experiment": _experiment_name(spec),
    }
