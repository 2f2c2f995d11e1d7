"""Prefect tasks of the merge pipeline: one thin task per verb over ``mergeflow.pipeline``.

Each takes the run's :class:`~mergeflow.run.RunInputs` (the spec, the checkpoints' digests,
the cache folder) and, where it acts on one, a candidate; each returns URIs or small dicts of
scores. Weights and images stay in the result store and the cache. Only I/O retries
(fetching, registration); the math never does.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mergeflow import pipeline
from mergeflow.candidates import AnyCandidate, DataAware, Routed
from mergeflow.evaluation import REPORT, SELECTION
from mergeflow.run import RunInputs, open_run
from mergeflow.selection import GridPoint, Selection
from mergeflow.spec import MergeSpec
from tasks.checkpoints import RETRY_ON_SERVER_ERRORS


@task(
    name="resolve inputs",
    task_run_name="resolve the checkpoints of {spec.registered_model}",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
)
def resolve_inputs(spec: MergeSpec, cache_dir: str | None = None) -> RunInputs:
    """The spec with its checkpoints' digests (fetched through the cache when not there)."""
    return RunInputs.resolve(spec, cache_dir)


@task(name="check bases", task_run_name="check the bases of {inputs.spec.registered_model}")
def check_bases(inputs: RunInputs) -> dict[str, float]:
    """Each task's relative distance from the base; refuses (or warns about) a checkpoint
    that was not fine-tuned from it, before any merge."""
    return pipeline.check_bases(open_run(inputs))


@task(
    name="prepare evaluation",
    task_run_name="prepare heads and images of {inputs.spec.registered_model}",
)
def prepare_evaluation(inputs: RunInputs) -> dict:
    """Build every task's zero-shot head and prepared splits (once; cached on disk)."""
    context = open_run(inputs).context
    return {
        t.name: {split: len(data.labels) for split, data in t.splits.items()} for t in context.tasks
    }


@task(name="factorize", task_run_name="factorize {inputs.spec.registered_model}", tags=["gpu"])
def factorize(inputs: RunInputs) -> str:
    """One SVD per (matrix, task) up to the grid's largest rank; the factors' local path."""
    return open_run(inputs).factors_path()


@task(name="adapt", task_run_name="adapt {candidate.label}", tags=["gpu"])
def adapt(inputs: RunInputs, candidate: DataAware) -> str:
    """Run a data-aware method (AdaMerging, CART + AdaMerging, Fisher, RegMean) once per
    checkpoints, params and samples; returns the URI of its merged weights in the result
    store. On the GPU when there is one: the adaptation's forward and backward passes are
    the costly part of these methods."""
    uri, _ = candidate.adapted(open_run(inputs))
    return uri


@task(
    name="align checkpoints",
    task_run_name="align the checkpoints of {inputs.spec.registered_model}",
)
def align_checkpoints(inputs: RunInputs) -> RunInputs:
    """Permute each checkpoint onto the reference task's (weight matching), when the spec
    asks; the inputs then name the aligned files in the result store."""
    return pipeline.align_checkpoints(inputs)


@task(name="score", task_run_name="score {candidate.label} on {split}")
def score(inputs: RunInputs, candidate: AnyCandidate, split: str = REPORT) -> dict[str, float]:
    """Per-task accuracy of a candidate on a split, kept by the candidate's content key and
    the data's digest."""
    if split not in (SELECTION, REPORT):
        raise ValueError(f"split must be {SELECTION!r} or {REPORT!r}, not {split!r}")
    return pipeline.score(open_run(inputs), candidate, split)


@task(name="select", task_run_name="select the winner of {inputs.spec.registered_model}")
def select_winner(
    inputs: RunInputs, points: list[GridPoint], finetuned: dict[str, float]
) -> Selection:
    """Each family's best and the winner, compared (paired bootstrap over the selection
    images) with the runner-up and weight averaging; ties go by the tie rule."""
    return pipeline.choose(open_run(inputs), points, finetuned)


@task(name="read adaptation", task_run_name="read what {candidate.label} learned")
def read_adaptation(inputs: RunInputs, candidate: DataAware) -> dict:
    """Coefficients, entropies and sample counts of a data-aware candidate (from its file)."""
    return candidate.learned(open_run(inputs))


@task(name="compress", task_run_name="compress {inputs.spec.registered_model}", tags=["gpu"])
def compress(inputs: RunInputs) -> dict:
    """Build (or reuse) the CART index; its path, label and size against the checkpoints."""
    return pipeline.compression_summary(open_run(inputs))


@task(name="score index", task_run_name="score the CART index on {split}")
def score_index(inputs: RunInputs, index_path: str, split: str = REPORT) -> dict[str, float]:
    """Each task's model rebuilt from the index, scored on that task (cached)."""
    return pipeline.score_index(open_run(inputs), index_path, split)


@task(
    name="register merged model",
    task_run_name="register {inputs.spec.registered_model}",
    **RETRY_ON_SERVER_ERRORS,
)
def register_winner(
    inputs: RunInputs,
    winner: AnyCandidate,
    grid: list[dict],
    comparison: dict,
    lineage: dict[str, str],
    charts: dict[str, str] | None = None,
) -> dict:
    """Log the run (grid, comparison, charts) to MLflow and register the winner, once per
    model: a retry or a re-run that finds this model registered makes no new version."""
    return pipeline.register_winner(open_run(inputs), winner, grid, comparison, lineage, charts)


@task(
    name="register index",
    task_run_name="register {inputs.spec.registered_model}-indexed",
    **RETRY_ON_SERVER_ERRORS,
)
def register_index(inputs: RunInputs, compression: dict, summary: dict, lineage: dict) -> dict:
    """Register the CART index as one model that takes the task name (once per index)."""
    return pipeline.register_index(open_run(inputs), compression, summary, lineage)


@task(
    name="register routed model",
    task_run_name="register {inputs.spec.registered_model}-routed",
    **RETRY_ON_SERVER_ERRORS,
)
def register_routed(inputs: RunInputs, routed: Routed, summary: dict, lineage: dict) -> dict:
    """Register a Twin-Merging routed model as one model that routes each image itself."""
    return pipeline.register_routed(open_run(inputs), routed, summary, lineage)


@task(name="draw charts", task_run_name="draw charts of {name}")
def draw_charts(name: str, grid: list[dict], comparison: dict, folder: str) -> dict:
    """Accuracy against rank per scale, the models × tasks heatmap, per-task bars and radar
    of the best of each kind; run-relative path → file."""
    from mergeflow import charts

    out = Path(folder)
    drawn = {
        "charts/accuracy_vs_rank.png": charts.accuracy_vs_rank(grid, out / "accuracy_vs_rank.png"),
        "charts/per_task_heatmap.png": charts.per_task_heatmap(
            comparison, out / "per_task_heatmap.png"
        ),
        "charts/per_task_bars.png": charts.per_task_bars(comparison, out / "per_task_bars.png"),
    }
    num_tasks = len(next(iter(comparison.values()))["accuracy"]) if comparison else 0
    if num_tasks >= 3:
        drawn["charts/per_task_radar.png"] = charts.per_task_radar(
            comparison, out / "per_task_radar.png"
        )
    return {path: str(file) for path, file in drawn.items()}


@task(
    name="score registered model",
    task_run_name="score {model_uri} on {split}",
    **RETRY_ON_SERVER_ERRORS,
)
def score_registered_model(inputs: RunInputs, model_uri: str, split: str = REPORT) -> dict:
    """Load ``model_uri`` from the MLflow registry and summarize it on the spec's split."""
    run = open_run(inputs)
    return pipeline.summary_of(run, pipeline.registered_model_scores(run, model_uri, split), split)
