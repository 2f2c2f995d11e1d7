"""The merge pipeline's steps as plain functions of a :class:`~mergeflow.run.Run` (Prefect
tasks wrap them in ``tasks/``).

Heavy intermediate results live in the result store (:mod:`mergeflow.results`:
``$MERGEFLOW_RESULT_STORE``, else the local cache), keyed by the content they come from:
CART factors by the checkpoints' digests and the factorization settings, data-aware merges
by the checkpoints, method, parameters and samples, and scores by the candidate's content
key (:mod:`mergeflow.candidates`) and the evaluation data's digest. Prepared images stay in
the local cache, keyed by the data's digest and the transform.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from mergeflow import registry, selection, stats
from mergeflow.candidates import Candidate, FixedMethod, Routed, reference
from mergeflow.checkpoints import open_checkpoint, save_state_dict
from mergeflow.errors import ParameterError, RegistrationError
from mergeflow.evaluation import REPORT, SELECTION, accuracy, summarize
from mergeflow.run import Run, RunInputs, content_key, load_index
from mergeflow.selection import GridPoint
from mergeflow.statedict import StateDict

log = logging.getLogger(__name__)

MissingHeads = Literal["refuse", "zero"]


def align_checkpoints(inputs: RunInputs) -> RunInputs:
    """With the spec's ``align``: every task's checkpoint but the reference's permuted onto
    the reference's by weight matching (kept in the result store, keyed by both digests),
    and inputs whose spec names the aligned files (``align`` done: None). Without it, the
    inputs as they are."""
    from mergeflow.align import match_weights
    from mergeflow.storage import file_sha256

    spec = inputs.spec
    if spec.align is None:
        return inputs
    from functools import cache

    from mergeflow.models import image_tower_heads

    run = Run(inputs)
    reference = spec.align.reference or spec.tasks[0].name
    reference_uri = run.checkpoint_of(reference)
    heads = spec.align.heads or image_tower_heads(spec.model)
    # read only when an aligned file is not in the store yet
    reference_state = cache(lambda: run.load_task_state(reference))
    tasks, digests = [], dict(inputs.digests)
    for t in spec.tasks:
        if t.name == reference:
            tasks.append(t)
            continue
        key = content_key("aligned/1", digests[reference_uri], digests[t.checkpoint], heads)
        name = f"{key}.safetensors"

        def build(uri: str, task=t) -> None:
            aligned, _ = match_weights(reference_state(), run.load_task_state(task.name), heads)
            origin = {
                "mergeflow.aligned_to": reference_uri,
                "mergeflow.aligned_from": task.checkpoint,
            }
            save_state_dict(aligned, uri, origin)

        path = run.store.file("aligned", name, build)
        uri = run.store.uri("aligned", name)
        digests[uri] = file_sha256(path)
        log.info("align: %s permuted onto %s (%s)", t.checkpoint, reference_uri, uri)
        tasks.append(t.model_copy(update={"checkpoint": uri}))
    aligned_spec = spec.model_copy(update={"tasks": tuple(tasks), "align": None})
    return RunInputs(spec=aligned_spec, digests=digests, cache_dir=inputs.cache_dir)


def check_bases(run: Run) -> dict[str, float]:
    """Each task's ‖θ_t − θ₀‖ / ‖θ₀‖ (kept in the result store by the checkpoints' digests);
    a task beyond ``spec.max_base_distance`` is refused or warned about per
    ``spec.base_check``."""
    from mergeflow.checks import relative_distance

    spec = run.spec
    if spec.base_check == "off":
        return {}
    distances = {}
    with open_checkpoint(spec.base, run.cache) as base:
        for t in spec.tasks:
            key = content_key("base-distance/1", run.base_digest, run.digests[t.checkpoint])
            record = run.store.read_json("checks", key)
            if record is None:
                with open_checkpoint(t.checkpoint, run.cache, base=base) as tuned:
                    record = {"distance": relative_distance(base, tuned)}
                run.store.write_json("checks", key, record)
            distances[t.name] = record["distance"]
    for t in spec.tasks:
        distance = distances[t.name]
        if distance <= spec.max_base_distance:
            continue
        message = (
            f"task {t.name!r}: {t.checkpoint} lies {distance:.3f} (relative L2) from the base "
            f"{spec.base}, beyond max_base_distance {spec.max_base_distance}: it was probably "
            "not fine-tuned from this base"
        )
        if spec.base_check == "refuse":
            raise ParameterError(message + " (set base_check: warn to merge it anyway)")
        log.warning(message)
    return distances


def score_record(
    run: Run,
    model_key: str,
    split: str,
    compute: Callable[[], dict[str, np.ndarray]],
    only: str | None = None,
) -> dict:
    """The score record of the model named ``model_key`` on ``split`` (of task ``only``):
    from the result store when it was scored before on the same data, else ``compute()``d
    (per-image correctness) and stored. It holds per task the ``accuracy``, the packed
    per-image ``correct``-ness (for paired comparisons) and the number of ``images``."""
    key = content_key("scores/2", model_key, split, run.context.data_digest(split, only))
    record = run.store.read_json("scores", key)
    if record is None:
        correct = compute()
        record = {
            "accuracy": {t: float(c.mean()) for t, c in correct.items()},
            "correct": {t: stats.pack(c) for t, c in correct.items()},
            "images": {t: len(c) for t, c in correct.items()},
            "model": model_key,
            "split": split,
        }
        run.store.write_json("scores", key, record)
    return record


def cached_scores(
    run: Run,
    model_key: str,
    split: str,
    compute: Callable[[], dict[str, np.ndarray]],
    only: str | None = None,
) -> dict[str, float]:
    """Accuracy per task of :func:`score_record`, in the spec's task order (the record's
    keys are sorted)."""
    record = score_record(run, model_key, split, compute, only)
    return {t: record["accuracy"][t] for t in run.task_names if only in (None, t)}


def _candidate_records(run: Run, candidate: Candidate, split: str) -> list[dict]:
    """``candidate``'s score records on ``split``: one, or one per task for a candidate
    that is one model per task (each task's own model scored on that task only)."""
    records = []
    for task in run.task_names if candidate.per_task else [None]:

        def compute(task=task):
            return candidate.judge(run, split, task)

        records.append(score_record(run, candidate.key(run, task), split, compute, only=task))
    return records


def score(run: Run, candidate: Candidate, split: str) -> dict[str, float]:
    """Per-task accuracy of ``candidate`` on ``split``, through the score store."""
    accuracy = {}
    for record in _candidate_records(run, candidate, split):
        accuracy.update(record["accuracy"])
    return {t: accuracy[t] for t in run.task_names}


def correctness(run: Run, candidate: Candidate, split: str) -> dict[str, np.ndarray]:
    """Per-task, per-image correctness of ``candidate`` on ``split``, through the score
    store."""
    correct = {}
    for record in _candidate_records(run, candidate, split):
        for t, packed in record["correct"].items():
            correct[t] = stats.unpack(packed, record["images"][t])
    return {t: correct[t] for t in run.task_names}


def choose(
    run: Run, points: Sequence[GridPoint], finetuned: Mapping[str, float]
) -> selection.Selection:
    """:func:`~mergeflow.selection.select` with evidence: the per-image correctness on the
    selection splits of each mergeable family's best and of weight averaging, weighted by
    1 / each task's fine-tuned accuracy (so differences are in mean normalized accuracy)."""
    bests = selection.select(points).family_best.values()
    correct = {
        p.candidate.label: correctness(run, p.candidate, SELECTION)
        for p in bests
        if not p.candidate.per_task
    }
    average = FixedMethod(name="average", params={}, label="weight averaging")
    correct[average.label] = correctness(run, average, SELECTION)
    weights = {t: 1 / a for t, a in finetuned.items()} if all(finetuned.values()) else None
    return selection.select(points, selection.Evidence(correct, weights, average.label))


def score_index(run: Run, path: str, split: str = REPORT) -> dict[str, float]:
    """Each task's model rebuilt from the CART index at ``path``, scored on that task."""
    scores = {}
    for name in run.task_names:
        key = content_key("model/1", "cart-index", Path(path).stem, name)

        def compute(task=name):
            rebuilt = load_index(path).rebuild(task, run.spec.device)
            return run.context.judge(rebuilt, split, only=task)

        scores.update(cached_scores(run, key, split, compute, only=name))
    return scores


def compression_summary(run: Run) -> dict:
    """Build (or reuse) the spec's CART index: its path, label and size against the
    fine-tuned checkpoints."""
    path = run.index_path()
    index_bytes = load_index(path).num_bytes()
    total = checkpoint_bytes(run)
    settings = run.spec.compression.model_dump(exclude={"register_model"}, exclude_none=True)
    return {
        "path": path,
        "label": "cart_indexed " + " ".join(f"{k}={v}" for k, v in settings.items()),
        "index_bytes": index_bytes,
        "checkpoint_bytes": total,
        "ratio": index_bytes / total,
    }


def checkpoint_bytes(run: Run) -> int:
    """Bytes of the spec's fine-tuned checkpoints' tensors."""
    total = 0
    with run.task_readers() as (_, readers):
        for reader in readers:
            total += sum(
                math.prod(shape) * dtype.itemsize for shape, dtype in reader.layout().values()
            )
    return total


def index_complement(run: Run, path: str) -> StateDict:
    """The base's tensors that the CART index at ``path`` does not hold (for a vision-only
    fine-tune: the text tower), which a model rebuilt from it needs."""
    held = load_index(path).average
    return {k: v for k, v in run.context.base.items() if k not in held}


def merged_weights(run: Run, candidate: Candidate) -> tuple[str, str]:
    """The candidate's merged weights, kept in the result store before anything is sent to
    the registry (so a registry that is down loses nothing): (store URI, local path)."""
    name = f"{candidate.key(run)}.safetensors"

    def build(uri: str) -> None:
        params = json.dumps(candidate.settings, sort_keys=True)
        metadata = {"mergeflow.method": candidate.method, "mergeflow.params": params}
        save_state_dict(candidate.state(run), uri, metadata)

    return run.store.uri("models", name), run.store.file("models", name, build)


def registration_key(name: str, model_key: str) -> str:
    """What makes registering idempotent: one registry version per (name, model)."""
    return content_key("registration/1", name, model_key)


def gate_of(run: Run, summary: dict, missing_heads: MissingHeads = "refuse") -> registry.Gate:
    """The promotion gate for a model with ``summary`` on this run's report data: a
    champion scored on other data is rescored here, by its own weights and heads (see
    :func:`registered_model_scores` for ``missing_heads``)."""
    from mergeflow.tracking import score_of

    def rescore(model_uri: str) -> float:
        scores = registered_model_scores(run, model_uri, missing_heads=missing_heads)
        return score_of(summary_of(run, scores))

    return registry.Gate(score_of(summary), report_digest(run), rescore)


def register_winner(
    run: Run,
    winner: Candidate,
    grid: list[dict],
    comparison: dict,
    lineage: dict[str, str],
    charts: dict[str, str] | None = None,
    missing_heads: MissingHeads = "refuse",
) -> dict:
    """Register the winner once per model: its weights are written to the result store
    first (if the registry cannot be reached, the error says where they are); a version
    already registered for this model is returned as it is, with no new MLflow run;
    otherwise the run is logged (grid, comparison, charts) and the model registered from
    it. ``missing_heads``: how the gate rescores a champion without a head for a task."""
    from mergeflow import tracking
    from mergeflow.checkpoints import load_state_dict

    spec = run.spec
    weights_uri, weights_path = merged_weights(run, winner)
    try:
        key = registration_key(spec.registered_model, winner.key(run))
        gate = gate_of(run, comparison[winner.label], missing_heads)
        registration = registry.registered(spec.registered_model, key, gate)
        if registration is None:
            record = winner.record()
            run_id = tracking.log_pipeline_run(spec, record, grid, comparison, lineage, charts)
            files = registry.ModelFiles(
                spec.model,
                run.context.heads,
                run.context.classes,
                weights=lambda: load_state_dict(weights_path),
            )
            tags = tracking.version_tags(spec, winner.method, winner.settings, lineage)
            registration = registry.register_model(
                spec.registered_model, files, gate, key, tags, run_id
            )
        return tracking.describe_registration(registration, spec)
    except Exception as exc:
        raise RegistrationError(
            f"registering {spec.registered_model} failed ({type(exc).__name__}: {exc}); "
            f"the merged weights of {winner.label} are kept at {weights_uri}"
        ) from exc


def register_index(run: Run, compression: dict, summary: dict, lineage: dict[str, str]) -> dict:
    """Register the CART index as ``NAME-indexed``, one model that rebuilds the named task's
    weights on demand (once per index)."""
    from mergeflow import tracking

    spec = run.spec
    name = f"{spec.registered_model}-indexed"
    key = registration_key(name, Path(compression["path"]).stem)
    gate = gate_of(run, summary)
    registration = registry.registered(name, key, gate)
    if registration is None:
        run_id = tracking.log_index_run(spec, compression, summary, lineage)
        files = registry.ModelFiles(
            spec.model,
            run.context.heads,
            run.context.classes,
            index_path=compression["path"],
            complement=index_complement(run, compression["path"]),
        )
        settings = spec.compression.model_dump(exclude={"register_model"}, exclude_none=True)
        tags = tracking.version_tags(spec, "cart_indexed", settings, lineage)
        registration = registry.register_model(name, files, gate, key, tags, run_id)
    return tracking.describe_registration(registration, spec)


def register_routed(run: Run, routed: Routed, summary: dict, lineage: dict[str, str]) -> dict:
    """Register a Twin-Merging routed model as ``NAME-routed``: one pyfunc (router, shared
    merge, twin vectors) that classifies images without being told their task."""
    from mergeflow import tracking
    from mergeflow.hf_clip import to_open_clip
    from mergeflow.twin import shared_keys

    spec = run.spec
    name = f"{spec.registered_model}-routed"
    key = registration_key(name, routed.key(run))
    gate = registry.Gate(
        tracking.score_of(summary),
        report_digest(run),
        lambda uri: tracking.score_of(summary_of(run, routed_model_scores(run, uri))),
    )
    registration = registry.registered(name, key, gate)
    if registration is None:
        info = routed.learned(run)
        storage = {k: float(info[k]) for k in ("stored_bytes", "checkpoint_bytes") if info.get(k)}
        run_id = tracking.log_side_run(
            spec, routed.name, routed.settings, summary, storage, lineage
        )
        path = routed.adapted(run)[1]
        held = shared_keys(path)
        complement = {k: v for k, v in to_open_clip(run.context.base).items() if k not in held}
        files = registry.ModelFiles(
            spec.model,
            run.context.heads,
            run.context.classes,
            twin_path=path,
            complement=complement,
        )
        tags = tracking.version_tags(spec, routed.name, routed.settings, lineage)
        registration = registry.register_model(name, files, gate, key, tags, run_id)
    return tracking.describe_registration(registration, spec)


def routed_model_scores(run: Run, model_uri: str, split: str = REPORT) -> dict[str, float]:
    """Per-task accuracy on ``split`` of a routed model from the registry, with its own
    router, twin vectors and heads."""
    from mergeflow.registry import load_registered_model
    from mergeflow.svd import resolve_device

    model = load_registered_model(model_uri)
    twin = model.twin.to(resolve_device(run.spec.device))
    scores = {}
    for t in run.context.tasks:
        if t.name not in model.heads:
            raise ParameterError(f"{model_uri} has no head for the spec's task {t.name!r}")
        data = t.splits[split]
        right = twin.correctness(data.images, data.labels, model.heads[t.name], run.spec.batch_size)
        scores[t.name] = float(right.float().mean())
    return scores


def report_digest(run: Run) -> str:
    """Digest of the report data (images, labels, heads of every task): two scores are
    comparable when they were taken on data with one digest."""
    return run.context.data_digest(REPORT)


def registered_model_scores(
    run: Run, model_uri: str, split: str = REPORT, missing_heads: MissingHeads = "refuse"
) -> dict[str, float]:
    """Per-task accuracy on ``split`` of a model loaded from the MLflow registry
    (``models:/NAME@champion``, ``models:/NAME/3``), with its own heads and weights. A
    model without a head for one of the spec's tasks is refused, or with ``missing_heads:
    zero`` scores 0 there: it cannot serve that task (a champion registered before the task
    arrived)."""
    from mergeflow.registry import load_registered_model

    spec = run.spec
    model = load_registered_model(model_uri)
    # versions logged before the model kept its config name do not say; their forward pass
    # fails on images of the wrong size instead
    config = getattr(model, "config", spec.model)
    if config != spec.model:
        raise ParameterError(
            f"{model_uri} is a {config} model; the spec's tasks are prepared for {spec.model}"
        )
    context = run.context
    missing = [t.name for t in context.tasks if t.name not in model.heads]
    if missing and missing_heads == "refuse":
        raise ParameterError(f"{model_uri} has no head for the spec's task(s) {missing}")
    scores = dict.fromkeys(missing, 0.0)
    for t in context.tasks:
        if t.name in scores:
            continue
        model._use_task(t.name)
        own_head = dataclasses.replace(t, head=model.heads[t.name])
        scores[t.name] = accuracy(model.model, own_head, split, spec.batch_size, spec.device)
    return {t.name: scores[t.name] for t in context.tasks}


def summary_of(run: Run, scores: dict[str, float], split: str = REPORT) -> dict:
    """``scores`` summarized against the fine-tuned models' scores on the same split (NaN
    normalized accuracy when the spec has no fine-tuned reference)."""
    if run.spec.has_reference("finetuned"):
        finetuned = score(run, reference("finetuned"), split)
    else:
        finetuned = {name: math.nan for name in run.task_names}
    return summarize(scores, finetuned)
