"""Record a pipeline run in MLflow: the grid as nested runs, the comparison, the winner.

The tracking store comes from ``MLFLOW_TRACKING_URI`` (for example ``sqlite:///mlflow.db``
or ``http://mlflow.internal:5000``). Nothing secret is logged: parameters and tags hold the
method, its settings, URIs and digests only.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

import mergeflow
from mergeflow.registry import register_merged_model, reuse_version
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


_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_./ -]+")


def metric_name(text: str) -> str:
    """``text`` with the characters MLflow refuses in metric names replaced."""
    return _METRIC_UNSAFE.sub("_", text).strip("_")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``$MERGEFLOW_CODE_VERSION`` (set it in images built without .git), else the package
    version and the git commit of the checkout it runs from (``+dirty`` with local changes)."""
    if os.environ.get("MERGEFLOW_CODE_VERSION"):
        return os.environ["MERGEFLOW_CODE_VERSION"]
    version = mergeflow.__version__
    root = Path(mergeflow.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+git.{commit[:12]}" + (".dirty" if dirty else "")


def score_of(summary: Mapping) -> float:
    """What the aliases compare: mean normalized accuracy, or mean accuracy without a
    fine-tuned reference."""
    value = summary["mean_normalized"]
    return summary["mean_accuracy"] if math.isnan(value) else value


def record_run(
    spec: MergeSpec,
    weights: Callable[[], Mapping[str, torch.Tensor]],
    heads: Mapping[str, torch.Tensor],
    classes: Mapping[str, tuple[str, ...]],
    best: dict,
    grid: list[dict],
    comparison: dict,
    lineage: Mapping[str, str],
    registration_key: str,
    report_data: str,
    rescore: Callable[[str], float] | None = None,
    charts: Mapping[str, str] | None = None,
) -> dict:
    """``grid``: one dict per point with method, params, label, accuracy (per task),
    mean_accuracy, mean_normalized. ``best``: the chosen point. ``comparison``: label →
    summary on the report split, the chosen point's under its label. ``weights`` gives the
    winner's state dict; it is called only when this model is not registered yet (see
    :func:`mergeflow.registry.register_merged_model` for ``registration_key``,
    ``report_data`` and ``rescore``). ``charts``: run-relative path → image file."""
    import mlflow

    _use_experiment(_experiment_name(spec))
    winner = comparison[best["label"]]
    reused = reuse_version(
        mlflow.MlflowClient(),
        spec.registered_model,
        registration_key,
        score_of(winner),
        report_data,
        rescore,
    )
    if reused is not None:
        return _registration_result(reused, spec)
    with mlflow.start_run(run_name=best["label"]) as run:
        mlflow.set_tags({"mergeflow.spec": spec.model_dump_json()[:5000], **lineage})
        for i, point in enumerate(grid):
            with mlflow.start_run(run_name=f"grid {point['label']}", nested=True):
                mlflow.log_params({"method": point["method"], **point["params"]})
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
            SCORE_METRIC: winner["mean_normalized"],
            "report_mean_accuracy": winner["mean_accuracy"],
        }
        for task, acc in winner["accuracy"].items():
            metrics[f"report_accuracy.{task}"] = acc
            metrics[f"report_normalized.{task}"] = winner["normalized"][task]
        for candidate, summary in comparison.items():
            if candidate != best["label"]:
                name = metric_name(candidate.replace(":", "."))
                metrics[f"baseline.{name}.report_mean_accuracy"] = summary["mean_accuracy"]
        mlflow.log_text(
            json.dumps({"grid": grid, "comparison": comparison}, indent=2), "results.json"
        )
        for artifact_path, local in (charts or {}).items():
            mlflow.log_artifact(local, str(Path(artifact_path).parent))
        registration = register_merged_model(
            name=spec.registered_model,
            model_config=spec.model,
            weights=weights,
            heads=heads,
            classes=classes,
            score=score_of(winner),
            params={
                "method": best["method"],
                **best["params"],
                "model": spec.model,
                "num_tasks": len(spec.tasks),
            },
            metrics=metrics,
            tags={
                **lineage,
                "mergeflow.version": mergeflow.__version__,
                "mergeflow.code_version": code_version(),
                "mergeflow.spec_digest": spec.digest(),
                "method": best["method"],
                "params": json.dumps(best["params"], sort_keys=True),
                **{k: str(v) for k, v in best["params"].items() if k in ("rank_ratio", "scale")},
            },
            registration_key=registration_key,
            report_data=report_data,
            rescore=rescore,
            run_id=run.info.run_id,
        )
    return _registration_result(registration, spec)


def record_index(
    spec: MergeSpec,
    compression: Mapping,
    summary: Mapping,
    heads: Mapping[str, torch.Tensor],
    classes: Mapping[str, tuple[str, ...]],
    lineage: Mapping[str, str],
    registration_key: str,
    report_data: str,
    rescore: Callable[[str], float] | None = None,
    complement: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """Register the CART index as ``REGISTERED_MODEL-indexed``: one model that rebuilds the
    named task's weights on demand. ``summary``: per-task report accuracy of the rebuilt
    models against the fine-tuned ones. ``complement``: the base's tensors the index lacks."""
    import mlflow

    assert spec.compression is not None
    _use_experiment(_experiment_name(spec))
    name = f"{spec.registered_model}-indexed"
    settings = spec.compression.model_dump(exclude={"register_model"}, exclude_none=True)
    reused = reuse_version(
        mlflow.MlflowClient(), name, registration_key, score_of(summary), report_data, rescore
    )
    if reused is not None:
        return _registration_result(reused, spec)
    with mlflow.start_run(run_name=f"cart_indexed {settings}") as run:
        mlflow.set_tags(dict(lineage))
        metrics = {
            "index_bytes": compression["index_bytes"],
            "checkpoint_bytes": compression["checkpoint_bytes"],
            "storage_ratio": compression["ratio"],
            "report_mean_accuracy": summary["mean_accuracy"],
            SCORE_METRIC: summary["mean_normalized"],
            **{f"report_accuracy.{t}": a for t, a in summary["accuracy"].items()},
        }
        registration = register_merged_model(
            name=name,
            model_config=spec.model,
            weights=None,
            index_path=compression["path"],
            complement=complement,
            heads=heads,
            classes=classes,
            score=score_of(summary),
            params={"method": "cart_indexed", **settings, "model": spec.model},
            metrics=metrics,
            tags={
                **lineage,
                "mergeflow.version": mergeflow.__version__,
                "mergeflow.code_version": code_version(),
                "mergeflow.spec_digest": spec.digest(),
                "method": "cart_indexed",
                "params": json.dumps(settings, sort_keys=True),
            },
            registration_key=registration_key,
            report_data=report_data,
            rescore=rescore,
            run_id=run.info.run_id,
        )
    return _registration_result(registration, spec)


def _registration_result(registration, spec: MergeSpec) -> dict:
    """The registration as a small dict, with where its run's artifacts are and, for an
    HTTP tracking server, the run's page."""
    import mlflow

    run = mlflow.MlflowClient().get_run(registration.run_id)
    tracking = mlflow.get_tracking_uri()
    run_url = None
    if tracking.startswith(("http://", "https://")):
        run_url = (
            f"{tracking.rstrip('/')}/#/experiments/{run.info.experiment_id}"
            f"/runs/{registration.run_id}"
        )
    return {
        "artifact_uri": run.info.artifact_uri,
        "run_url": run_url,
        "name": registration.name,
        "version": registration.version,
        "aliases": list(registration.aliases),
        "previous_champion": registration.previous_champion,
        "run_id": registration.run_id,
        "experiment": _experiment_name(spec),
        "reused": registration.reused,
    }
