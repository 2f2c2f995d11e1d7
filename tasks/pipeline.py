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


@task(name="score candidate", task_run_name="score {candidate[label]} on {split}")
def score_candidate(
    spec: MergeSpec,
    candidate: dict,
    split: str = REPORT,
    factors_path: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, float]:
    """Per-task accuracy of a candidate ({method, params, label}) on a split. Candidates that
    are one model per task (finetuned, tall_masks, cart_indexed) score each task's own model
    on that task only."""
    if split not in (SELECTION, REPORT):
        raise ValueError(f"split must be {SELECTION!r} or {REPORT!r}, not {split!r}")
    cache = _cache(cache_dir)
    context = pipeline.evaluation_context(spec, cache)
    if candidate["method"] == "finetuned" or pipeline.is_per_task(candidate["method"]):
        scores = {}
        for t in spec.tasks:
            state = pipeline.candidate_state(spec, cache, candidate, factors_path, task=t.name)
            scores.update(context.score(state, split, only=t.name))
        return scores
    state = pipeline.candidate_state(spec, cache, candidate, factors_path)
    return context.score(state, split)


@task(name="read adaptation", task_run_name="read what {candidate[label]} learned")
def read_adaptation(spec: MergeSpec, candidate: dict, cache_dir: str | None = None) -> dict:
    """Coefficients, entropies and sample counts of a data-aware candidate (from its file)."""
    return pipeline.adaptation_info(spec, _cache(cache_dir), candidate)


@task(name="compress", task_run_name="compress {spec.registered_model}", tags=["gpu"])
def compress_checkpoints(spec: MergeSpec, cache_dir: str | None = None) -> dict:
    """Build (or reuse) the CART index; returns its path and its size against the checkpoints."""
    cache = _cache(cache_dir)
    path = pipeline.index_path(spec, cache)
    index_bytes = pipeline.load_index(path).num_bytes()
    checkpoint_bytes = pipeline.checkpoint_bytes(spec, cache)
    return {
        "path": path,
        "index_bytes": index_bytes,
        "checkpoint_bytes": checkpoint_bytes,
        "ratio": index_bytes / checkpoint_bytes,
    }


@task(name="score index", task_run_name="score the CART index on {split}")
def score_index(
    spec: MergeSpec, index_path: str, split: str = REPORT, cache_dir: str | None = None
) -> dict[str, float]:
    """Each task's model rebuilt from the index, scored on that task."""
    cache = _cache(cache_dir)
    context = pipeline.evaluation_context(spec, cache)
    index = pipeline.load_index(index_path)
    scores = {}
    for t in spec.tasks:
        scores.update(context.score(index.rebuild(t.name, spec.device), split, only=t.name))
    return scores


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
    state = pipeline.candidate_state(spec, cache, best, factors_path)
    heads, classes = pipeline.heads_and_classes(spec, cache)
    return record_run(spec, state, heads, classes, best, grid, comparison, lineage)


@task(
    name="register index",
    task_run_name="register {spec.registered_model}-indexed",
    retries=2,
    retry_delay_seconds=[5, 30],
)
def register_index(
    spec: MergeSpec, compression: dict, scores: dict, lineage: dict, cache_dir: str | None = None
) -> dict:
    """Register the CART index as one model that takes the task name."""
    from mergeflow.tracking import record_index

    heads, classes = pipeline.heads_and_classes(spec, _cache(cache_dir))
    return record_index(spec, compression, scores, heads, classes, lineage)
