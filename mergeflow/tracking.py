"""Log a pipeline run in MLflow and return its id: the grid as nested runs, the comparison,
the winner's metrics, the charts. Registering a model of a run is :mod:`mergeflow.registry`'s.

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
from collections.abc import Mapping
from pathlib import Path

import mergeflow
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


def version_tags(spec: MergeSpec, method: str, params: Mapping, lineage: Mapping[str, str]):
    """The tags of a registered version: lineage (sources, digests, the Prefect run), the
    code and the spec that made it, the method and its parameters."""
    return {
        **lineage,
        "mergeflow.version": mergeflow.__version__,
        "mergeflow.code_version": code_version(),
        "mergeflow.spec_digest": spec.digest(),
        "method": method,
        "params": json.dumps(dict(params), sort_keys=True),
        **{k: str(v) for k, v in params.items() if k in ("rank_ratio", "scale")},
    }


def log_pipeline_run(
    spec: MergeSpec,
    winner: Mapping,
    grid: list[dict],
    comparison: Mapping[str, dict],
    lineage: Mapping[str, str],
    charts: Mapping[str, str] | None = None,
) -> str:
    """Log a pipeline run in the spec's experiment and return its run id: the grid as
    nested runs (and as steps of the parent), the winner's report metrics and each
    baseline's, ``results.json`` (grid and comparison) and the charts.

    ``grid``: one dict per point with method, params, label, accuracy (per task),
    mean_accuracy, mean_normalized. ``winner``: the chosen point's method, params and
    label. ``comparison``: label → summary on the report split, the winner's under its
    label. ``charts``: run-relative path → image file."""
    import mlflow

    _use_experiment(_experiment_name(spec))
    summary = comparison[winner["label"]]
    with mlflow.start_run(run_name=winner["label"]) as run:
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
            SCORE_METRIC: summary["mean_normalized"],
            "report_mean_accuracy": summary["mean_accuracy"],
        }
        for task, acc in summary["accuracy"].items():
            metrics[f"report_accuracy.{task}"] = acc
            metrics[f"report_normalized.{task}"] = summary["normalized"][task]
        for label, other in comparison.items():
            if label != winner["label"]:
                name = metric_name(label.replace(":", "."))
                metrics[f"baseline.{name}.report_mean_accuracy"] = other["mean_accuracy"]
        mlflow.log_metrics(metrics)
        mlflow.log_params(
            {
                "method": winner["method"],
                **winner["params"],
                "model": spec.model,
                "num_tasks": len(spec.tasks),
            }
        )
        mlflow.log_text(
            json.dumps({"grid": grid, "comparison": comparison}, indent=2), "results.json"
        )
        for artifact_path, local in (charts or {}).items():
            mlflow.log_artifact(local, str(Path(artifact_path).parent))
        return run.info.run_id


def log_index_run(
    spec: MergeSpec, compression: Mapping, summary: Mapping, lineage: Mapping[str, str]
) -> str:
    """Log the CART index's run (its size against the checkpoints, each task's report
    accuracy of the rebuilt models) in the spec's experiment; returns its run id."""
    assert spec.compression is not None
    settings = spec.compression.model_dump(exclude={"register_model"}, exclude_none=True)
    storage = {
        "index_bytes": compression["index_bytes"],
        "checkpoint_bytes": compression["checkpoint_bytes"],
        "storage_ratio": compression["ratio"],
    }
    return log_side_run(spec, "cart_indexed", settings, summary, storage, lineage)


def log_side_run(
    spec: MergeSpec,
    method: str,
    settings: Mapping,
    summary: Mapping,
    metrics: Mapping[str, float],
    lineage: Mapping[str, str],
) -> str:
    """Log a model registered beside the winner (the CART index, a routed model): its
    ``metrics``, each task's report accuracy, its method and settings, in the spec's
    experiment; returns the run id."""
    import mlflow

    _use_experiment(_experiment_name(spec))
    with mlflow.start_run(run_name=f"{method} {dict(settings)}") as run:
        mlflow.set_tags(dict(lineage))
        mlflow.log_metrics(
            {
                **metrics,
                "report_mean_accuracy": summary["mean_accuracy"],
                SCORE_METRIC: summary["mean_normalized"],
                **{f"report_accuracy.{t}": a for t, a in summary["accuracy"].items()},
            }
        )
        flat = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in settings.items()}
        mlflow.log_params({"method": method, **flat, "model": spec.model})
        return run.info.run_id


def describe_registration(registration, spec: MergeSpec) -> dict:
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
