"""Prefect tasks of the merge pipeline: thin wrappers over ``mergeflow.pipeline``.

They pass the spec, URIs and small dicts of scores; weights and images stay on disk under
the cache. Only I/O retries (registration); the math never does.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mergeflow import pipeline
from mergeflow.errors import RegistrationError
from mergeflow.evaluation import REPORT, SELECTION
from mergeflow.spec import MergeSpec
from mergeflow.storage import CheckpointCache
from tasks.checkpoints import RETRY_ON_SERVER_ERRORS


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


@task(name="check bases", task_run_name="check the bases of {spec.registered_model}")
def check_bases(spec: MergeSpec, cache_dir: str | None = None) -> dict[str, float]:
    """Each task's relative distance from the base; refuses (or warns about) a checkpoint
    that was not fine-tuned from it, before any merge."""
    return pipeline.check_bases(spec, _cache(cache_dir))


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
    """Selection-split accuracy per task of one CART grid point (cached by content)."""
    return pipeline.score_grid_point(spec, _cache(cache_dir), factors_path, rank_ratio, scale)


@task(name="score candidate", task_run_name="score {candidate[label]} on {split}")
def score_candidate(
    spec: MergeSpec,
    candidate: dict,
    split: str = REPORT,
    factors_path: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, float]:
    """Per-task accuracy of a candidate ({method, params, label}) on a split, cached by the
    candidate's recipe and the data's digest. Candidates that are one model per task
    (finetuned, tall_masks, cart_indexed) score each task's own model on that task only."""
    if split not in (SELECTION, REPORT):
        raise ValueError(f"split must be {SELECTION!r} or {REPORT!r}, not {split!r}")
    return pipeline.score_candidate(spec, _cache(cache_dir), candidate, split, factors_path)


@task(name="merge with data", task_run_name="adapt {candidate[label]}", tags=["gpu"])
def merge_with_data(spec: MergeSpec, candidate: dict, cache_dir: str | None = None) -> str:
    """Run a data-aware method (AdaMerging, CART + AdaMerging, Fisher, RegMean) once per
    checkpoints, params and samples; returns the URI of its merged weights in the result
    store. On the GPU when there is one: the adaptation's forward and backward passes are
    the costly part of these methods."""
    uri, _ = pipeline.data_aware_weights(spec, _cache(cache_dir), candidate)
    return uri


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
    """Each task's model rebuilt from the index, scored on that task (cached)."""
    return pipeline.score_index(spec, _cache(cache_dir), index_path, split)


def _rescore(spec: MergeSpec, cache: CheckpointCache):
    """How the promotion gate scores a champion that was scored on other report data."""
    from mergeflow.tracking import score_of

    def rescore(model_uri: str) -> float:
        scores = pipeline.registered_model_scores(spec, cache, model_uri)
        return score_of(pipeline.summary_of(spec, cache, scores))

    return rescore


@task(
    name="register merged model",
    task_run_name="register {spec.registered_model}",
    **RETRY_ON_SERVER_ERRORS,
)
def register_winner(
    spec: MergeSpec,
    factors_path: str,
    best: dict,
    grid: list[dict],
    comparison: dict,
    lineage: dict[str, str],
    charts: dict[str, str] | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Log the grid, the comparison and the charts to MLflow and register the winner, once
    per model: a retry or a re-run that finds this model registered makes no new version.
    The winner's weights are written to the result store first; if the registry cannot be
    reached, the error says where they are."""
    from mergeflow.checkpoints import load_state_dict
    from mergeflow.tracking import record_run

    cache = _cache(cache_dir)
    model_key = pipeline.candidate_key(spec, cache, best, factors_path)
    weights_uri, weights_path = pipeline.merged_weights(spec, cache, best, factors_path)
    heads, classes = pipeline.heads_and_classes(spec, cache)
    try:
        return record_run(
            spec,
            lambda: load_state_dict(weights_path),
            heads,
            classes,
            best,
            grid,
            comparison,
            lineage,
            registration_key=pipeline.registration_key(spec.registered_model, model_key),
            report_data=pipeline.report_digest(spec, cache),
            rescore=_rescore(spec, cache),
            charts=charts,
        )
    except Exception as exc:
        raise RegistrationError(
            f"registering {spec.registered_model} failed ({type(exc).__name__}: {exc}); "
            f"the merged weights of {best['label']} are kept at {weights_uri}"
        ) from exc


@task(
    name="register index",
    task_run_name="register {spec.registered_model}-indexed",
    **RETRY_ON_SERVER_ERRORS,
)
def register_index(
    spec: MergeSpec, compression: dict, scores: dict, lineage: dict, cache_dir: str | None = None
) -> dict:
    """Register the CART index as one model that takes the task name (once per index)."""
    from mergeflow.tracking import record_index

    cache = _cache(cache_dir)
    heads, classes = pipeline.heads_and_classes(spec, cache)
    name = f"{spec.registered_model}-indexed"
    return record_index(
        spec,
        compression,
        scores,
        heads,
        classes,
        lineage,
        registration_key=pipeline.registration_key(name, Path(compression["path"]).stem),
        report_data=pipeline.report_digest(spec, cache),
        rescore=_rescore(spec, cache),
        complement=pipeline.index_complement(spec, cache, compression["path"]),
    )


@task(name="draw charts", task_run_name="draw charts of {spec.registered_model}")
def draw_charts(spec: MergeSpec, grid: list[dict], comparison: dict, folder: str) -> dict:
    """Accuracy against rank per scale, per-task bars and radar; run-relative path → file."""
    from mergeflow import charts

    out = Path(folder)
    drawn = {
        "charts/accuracy_vs_rank.png": charts.accuracy_vs_rank(grid, out / "accuracy_vs_rank.png"),
        "charts/per_task_bars.png": charts.per_task_bars(comparison, out / "per_task_bars.png"),
    }
    if len(spec.tasks) >= 3:
        drawn["charts/per_task_radar.png"] = charts.per_task_radar(
            comparison, out / "per_task_radar.png"
        )
    return {name: str(path) for name, path in drawn.items()}


@task(
    name="score registered model",
    task_run_name="score {model_uri} on {split}",
    **RETRY_ON_SERVER_ERRORS,
)
def score_registered_model(
    spec: MergeSpec, model_uri: str, split: str = REPORT, cache_dir: str | None = None
) -> dict:
    """Load ``model_uri`` from the MLflow registry and summarize it on the spec's split."""
    cache = _cache(cache_dir)
    scores = pipeline.registered_model_scores(spec, cache, model_uri, split)
    return pipeline.summary_of(spec, cache, scores, split)
