"""Prefect tasks of the arrivals flow: thin verbs over ``mergeflow.arrivals``.

Listing the prefix and the stream's head records are I/O and retry; a fold is math and
does not (it is kept by content, so a re-run finds it done)."""

from __future__ import annotations

from prefect import task

from mergeflow import arrivals, pipeline
from mergeflow.arrivals import ArrivalsSpec, Landed, StreamHead
from mergeflow.candidates import AnyCandidate
from mergeflow.continual import Arrival, FoldRecord
from mergeflow.evaluation import REPORT
from mergeflow.results import ResultStore
from mergeflow.run import RunInputs, open_run
from mergeflow.storage import CheckpointCache
from tasks.checkpoints import RETRY_ON_SERVER_ERRORS, retry_on_transient_io

RETRY_ON_TRANSIENT_IO = {
    "retries": 3,
    "retry_delay_seconds": [2, 10, 30],
    "retry_condition_fn": retry_on_transient_io,
}


def _store(cache_dir: str | None) -> ResultStore:
    return ResultStore(CheckpointCache(cache_dir))


@task(name="list landed", task_run_name="list {spec.prefix}", **RETRY_ON_TRANSIENT_IO)
def list_landed(spec: ArrivalsSpec) -> tuple[list[Landed], list[str]]:
    """The checkpoints under the prefix that name a task, in landing order; and the
    entries that name none."""
    return arrivals.find_landed(spec)


@task(
    name="read stream head",
    task_run_name="read what {spec.registered_model} has taken in",
    **RETRY_ON_TRANSIENT_IO,
)
def read_head(spec: ArrivalsSpec, base_digest: str, cache_dir: str | None = None) -> StreamHead:
    return arrivals.read_head(_store(cache_dir), spec, base_digest)


@task(
    name="write stream head",
    task_run_name="record what {spec.registered_model} has taken in",
    **RETRY_ON_TRANSIENT_IO,
)
def write_head(
    spec: ArrivalsSpec, base_digest: str, head: StreamHead, cache_dir: str | None = None
) -> None:
    arrivals.write_head(_store(cache_dir), spec, base_digest, head)


@task(name="fold arrival", task_run_name="fold {arrival.task} into {spec.registered_model}",
      tags=["gpu"])  # fmt: skip
def fold_arrival(
    spec: ArrivalsSpec,
    base: Arrival,
    before: list[Arrival],
    arrival: Arrival,
    cache_dir: str | None = None,
) -> FoldRecord:
    """The continual state after ``before`` and then ``arrival``: found in the result store
    by its content key, or folded from the state before it (one fold)."""
    return arrivals.fold_arrivals(spec, base, [*before, arrival], _store(cache_dir))


@task(
    name="register arrivals",
    task_run_name="register {inputs.spec.registered_model} after {candidate.label}",
    **RETRY_ON_SERVER_ERRORS,
)
def register_arrivals(
    inputs: RunInputs,
    candidate: AnyCandidate,
    scores: dict[str, float],
    history: list[Arrival],
    lineage: dict[str, str],
) -> dict:
    """Register the merge of everything taken in as a new version (``challenger``), the
    arrival history in its tags; ``champion`` moves only if it beats the champion on this
    run's report data, where a champion without a head for a task that arrived after it
    scores 0 on that task (it cannot serve it)."""
    run = open_run(inputs)
    summary = pipeline.summary_of(run, scores, REPORT)
    tags = {**lineage, **arrivals.history_tags(history)}
    return pipeline.register_winner(
        run, candidate, [], {candidate.label: summary}, tags, missing_heads="zero"
    )
