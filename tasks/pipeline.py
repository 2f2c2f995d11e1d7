"""Prefect tasks of the merge pipeline: thin wrappers over ``mergeflow.pipeline``.

They pass the spec, URIs and small dicts of scores; weights and images stay on disk under
the cache. Only I/O retries (registration); the math never does.
"""

from __future__ import annotations

from prefect import task

from mergeflow import pipeline
from mergeflow.evaluation import REPORT, SELECTION
from mergeflow.spec import MergeSpec
from mergeflow.storage import CheckpointCache


def _cache(cache_dir: str | None) -> CheckpointCache:
    return CheckpointCache(cache_dir)


@task(
    name="prepare evaluation", task_run_name="prepare heads and images of {spec.registered_model}"
)
def prepare_evaluation(spec: MergeSpec, cache_dir: str | None = None) -> dict:
    """Build every task's zero-shot head and prepared splits (once; cached on disk)."""
    context = pipeline.evaluation_context(spec, _cache(cache_dir))
    return {
        t.name: {split: len(data.labels) for split, data in t.splits.items()} for t in context.tasks
    }


@task(name="factorize", task_run_name="factorize {spec.registered_model}", tags=["gpu"])
def factorize_checkpoints(spec: MergeSpec, cache_dir: str | None = None) -> str:
    """One SVD per (matrix, task); returns the path of the saved factors."""
    return pipeline.factorize(spec, _cache(cache_dir))


@task(name="evaluate grid point", task_run_name="evaluate rank={rank_ratio} scale={scale}")
def evaluate_grid_point(
    spec: MergeSpec,
    factors_path: str,
    rank_ratio: float,
    scale: float,
    cache_dir: str | None = None,
) -> dict[str, float]:
    return pipeline.score_grid_point(spec, _cache(cache_dir), factors_path, rank_ratio, scale)


@task(name="score candidate", task_run_name="score {candidate} on {split}")
def score_candidate(
    spec: MergeSpec,
    candidate: str,
    split: str = REPORT,
    factors_path: str | None = None,
    rank_ratio: float | None = None,
    scale: float | None = None,
    cache_dir: str | None = None,
) -> dict[str, float]:
    """Per-task accuracy of ``cart`` (a grid point) or of a baseline on a split."""
    cache = _cache(cache_dir)
    if candidate == "cart":
        state = pipeline.grid_point_state(factors_path, rank_ratio, scale, spec.device)
    else:
        state = pipeline.baseline_state(spec, candidate, cache)
    if split not in (SELECTION, REPORT):
        raise ValueError(f"split must be {SELECTION!r} or {REPORT!r}, not {split!r}")
    # a task's own fine-tuned model is scored on that task only
    only = candidate.split(":", 1)[1] if candidate.startswith("finetuned:") else None
    return pipeline.evaluation_context(spec, cache).score(state, split, only)


@task(
    name="register merged model",
    task_run_name="register {spec.registered_model}",
    retries=2,
    retry_delay_seconds=[5, 30],
)
def register_winner(
    spec: MergeSpec,
    factors_path: str,
    best: dict,
    grid: list[dict],
    comparison: dict,
    lineage: dict[str, str],
    cache_dir: str | None = None,
) -> dict:
    """Log the grid and the comparison to MLflow and register the winner."""
    from mergeflow.tracking import record_run

    cache = _cache(cache_dir)
    state = pipeline.grid_point_state(factors_path, best["rank_ratio"], best["scale"], spec.device)
    heads, classes = pipeline.heads_and_classes(spec, cache)
    return record_run(spec, state, heads, classes, best, grid, comparison, lineage)
