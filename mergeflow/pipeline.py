"""The merge pipeline's steps as plain functions (Prefect tasks wrap them in ``tasks/``).

Steps exchange URIs and small dicts. Heavy intermediate results live on disk under the cache,
keyed by the content they come from: CART factors by the digests of the checkpoints and the
factorization settings, prepared images by the data's digest and the transform. Within one
process the evaluation context (model, heads, prepared images) is built once and reused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from dataclasses import dataclass

import torch

from mergeflow.cart_grid import FORMAT as FACTORS_FORMAT
from mergeflow.cart_grid import CartFactors
from mergeflow.checkpoints import load_state_dict, open_checkpoint, save_state_dict
from mergeflow.data_aware import DataAwareInputs, DataAwareMethod, TaskSamples
from mergeflow.errors import ParameterError
from mergeflow.evaluation import (
    ADAPTATION,
    REPORT,
    SELECTION,
    PreparedTask,
    prepare_tasks,
    score_all,
)
from mergeflow.memory import release_large_frees
from mergeflow.merge import merge_readers
from mergeflow.methods import find_method, get_method
from mergeflow.models import create_model
from mergeflow.spec import MergeSpec
from mergeflow.statedict import StateDict
from mergeflow.storage import CheckpointCache
from mergeflow.svd import resolve_device

log = logging.getLogger(__name__)


def _content_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def checkpoint_digests(spec: MergeSpec, cache: CheckpointCache) -> dict[str, str]:
    """sha256 of the base and every task checkpoint, by URI (fetched through the cache)."""
    uris = [spec.base] + [t.checkpoint for t in spec.tasks]
    return {uri: cache.fetch(uri).digest() for uri in uris}


@dataclass
class EvaluationContext:
    """What scoring needs that no candidate changes: one model, heads, prepared splits."""

    spec: MergeSpec
    model: torch.nn.Module
    tasks: list[PreparedTask]

    def score(
        self, state: StateDict, split: str = SELECTION, only: str | None = None
    ) -> dict[str, float]:
        """Per-task accuracy of ``state`` on ``split`` (of task ``only``, if given)."""
        self.model.load_state_dict(state)
        tasks = [t for t in self.tasks if only in (None, t.name)]
        return score_all(self.model, tasks, split, self.spec.batch_size, self.spec.device)


@functools.lru_cache(maxsize=4)
def _context(spec_json: str, cache_root: str) -> EvaluationContext:
    spec = MergeSpec.model_validate_json(spec_json)
    cache = CheckpointCache(cache_root)
    base = load_state_dict(spec.base, cache)
    tasks = prepare_tasks(spec.tasks, spec.model, base, cache)
    return EvaluationContext(spec, create_model(spec.model, base), tasks)


def evaluation_context(spec: MergeSpec, cache: CheckpointCache) -> EvaluationContext:
    return _context(spec.model_dump_json(), str(cache.root))


def factorize(spec: MergeSpec, cache: CheckpointCache) -> str:
    """CART factors of the spec's checkpoints up to its largest rank ratio, saved under the
    cache keyed by the checkpoints' digests; an existing file with that key is reused."""
    digests = checkpoint_digests(spec, cache)
    max_ratio = max(spec.grid.rank_ratios)
    key = _content_key(FACTORS_FORMAT, [digests[t.checkpoint] for t in spec.tasks], max_ratio)
    path = cache.root / "factors" / f"{key}.safetensors"
    if path.is_file():
        log.info("reusing CART factors %s", path)
        return str(path)
    release_large_frees()
    readers = [open_checkpoint(t.checkpoint, cache) for t in spec.tasks]
    try:
        factors = CartFactors.factorize(readers, max_rank_ratio=max_ratio, device=spec.device)
    finally:
        for reader in readers:
            reader.close()
    factors.save(path)
    return str(path)


@functools.lru_cache(maxsize=2)
def _factors(path: str) -> CartFactors:
    return CartFactors.load(path)


def grid_point_state(
    factors_path: str, rank_ratio: float, scale: float, device="auto"
) -> StateDict:
    return _factors(factors_path).merge(rank_ratio, scale, device=device)


def is_per_task(method: str) -> bool:
    """Whether ``method`` builds one model per task rather than one merged model."""
    return method not in ("zeroshot", "finetuned") and find_method(method).per_task


def is_data_aware(method: str) -> bool:
    """Whether ``method`` reads samples of the tasks (AdaMerging, Fisher, RegMean, ...)."""
    return method not in ("zeroshot", "finetuned") and isinstance(
        find_method(method), DataAwareMethod
    )


def data_aware_path(spec: MergeSpec, cache: CheckpointCache, candidate: dict) -> str:
    """Run a data-aware method once per (checkpoints, method, params, samples) and keep its
    merged weights, with what it learned in the file's metadata, under the cache."""
    method = find_method(candidate["method"])
    params = method.parse_params(candidate.get("params", {}))
    digests = checkpoint_digests(spec, cache)
    samples_from = [
        (t.dataset.uri, t.dataset.adaptation_split or t.dataset.selection_split) for t in spec.tasks
    ]
    key = _content_key(
        "data-aware/1",
        [digests[spec.base]] + [digests[t.checkpoint] for t in spec.tasks],
        method.name,
        params.model_dump(mode="json"),
        samples_from,
    )
    path = cache.root / "adapted" / f"{key}.safetensors"
    if path.is_file():
        log.info("reusing %s result %s", method.name, path)
        return str(path)
    context = evaluation_context(spec, cache)
    base = load_state_dict(spec.base, cache)
    samples = []
    for t in context.tasks:
        images = t.splits[ADAPTATION].images
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        samples.append(TaskSamples(t.name, images[order], t.head))
    inputs = DataAwareInputs(
        model=create_model(spec.model, base),
        base=base,
        finetuned=[load_state_dict(t.checkpoint, cache) for t in spec.tasks],
        samples=samples,
        device=resolve_device(spec.device),
    )
    outcome = method.run(inputs, params)
    save_state_dict(
        outcome.state,
        path,
        {"mergeflow.method": method.name, "mergeflow.info": json.dumps(outcome.info)},
    )
    return str(path)


def adaptation_info(spec: MergeSpec, cache: CheckpointCache, candidate: dict) -> dict:
    """What a data-aware candidate learned (coefficients, entropies, ...), from its file."""
    with open_checkpoint(data_aware_path(spec, cache, candidate)) as reader:
        return json.loads(reader.metadata().get("mergeflow.info", "{}"))


def merge_state(
    spec: MergeSpec, cache: CheckpointCache, method: str, params: dict, task: str | None = None
) -> StateDict:
    """Run a registered method over the spec's checkpoints (streaming, key by key). A
    per-task method (tall_masks, cart_indexed) builds ``task``'s model."""
    merge_method = get_method(method)
    if merge_method.per_task:
        if task is None:
            raise ParameterError(f"method {method!r} builds one model per task: name the task")
        params = {**params, "task": [t.name for t in spec.tasks].index(task)}
    parsed = merge_method.parse_params(params)
    release_large_frees()
    readers = [open_checkpoint(t.checkpoint, cache) for t in spec.tasks]
    base = open_checkpoint(spec.base, cache) if merge_method.needs_base(parsed) else None
    try:
        return merge_readers(merge_method, readers, base, parsed, device=spec.device)
    finally:
        for reader in readers + ([base] if base else []):
            reader.close()


def candidate_state(
    spec: MergeSpec,
    cache: CheckpointCache,
    candidate: dict,
    factors_path: str | None = None,
    task: str | None = None,
) -> StateDict:
    """The weights of a candidate: ``{"method": "zeroshot"}`` (the base), ``{"method":
    "finetuned"}`` (``task``'s checkpoint), a CART grid point (from the factors when given),
    or any registered method with its params."""
    method, params = candidate["method"], candidate.get("params", {})
    if method == "zeroshot":
        return load_state_dict(spec.base, cache)
    if method == "finetuned":
        return load_state_dict(next(t.checkpoint for t in spec.tasks if t.name == task), cache)
    if is_data_aware(method):
        return load_state_dict(data_aware_path(spec, cache, candidate))
    if method == "cart" and factors_path is not None and set(params) <= {"rank_ratio", "scale"}:
        return grid_point_state(
            factors_path, params.get("rank_ratio", 0.12), params.get("scale", 1.0), spec.device
        )
    return merge_state(spec, cache, method, params, task)


def index_path(spec: MergeSpec, cache: CheckpointCache) -> str:
    """The spec's CART index (compression), built once per checkpoint digests and settings."""
    from mergeflow.cart_index import FORMAT as INDEX_FORMAT
    from mergeflow.cart_index import CartIndex

    assert spec.compression is not None
    digests = checkpoint_digests(spec, cache)
    key = _content_key(
        INDEX_FORMAT,
        [digests[t.checkpoint] for t in spec.tasks],
        [t.name for t in spec.tasks],
        spec.compression.model_dump(exclude={"register_model"}),
    )
    path = cache.root / "indexes" / f"{key}.safetensors"
    if path.is_file():
        log.info("reusing CART index %s", path)
        return str(path)
    readers = [open_checkpoint(t.checkpoint, cache) for t in spec.tasks]
    try:
        index = CartIndex.build(
            readers,
            [t.name for t in spec.tasks],
            rank_ratio=spec.compression.rank_ratio,
            energy=spec.compression.energy,
            device=spec.device,
        )
    finally:
        for reader in readers:
            reader.close()
    index.save(path)
    return str(path)


@functools.lru_cache(maxsize=2)
def load_index(path: str):
    from mergeflow.cart_index import CartIndex

    return CartIndex.load(path)


def checkpoint_bytes(spec: MergeSpec, cache: CheckpointCache) -> int:
    """Bytes of the spec's fine-tuned checkpoints' tensors."""
    total = 0
    for t in spec.tasks:
        with open_checkpoint(t.checkpoint, cache) as reader:
            total += sum(
                math.prod(shape) * dtype.itemsize for shape, dtype in reader.layout().values()
            )
    return total


def score_grid_point(
    spec: MergeSpec, cache: CheckpointCache, factors_path: str, rank_ratio: float, scale: float
) -> dict[str, float]:
    context = evaluation_context(spec, cache)
    return context.score(grid_point_state(factors_path, rank_ratio, scale, spec.device), SELECTION)


def score_report(spec: MergeSpec, cache: CheckpointCache, state: StateDict) -> dict[str, float]:
    return evaluation_context(spec, cache).score(state, REPORT)


def heads_and_classes(spec: MergeSpec, cache: CheckpointCache):
    context = evaluation_context(spec, cache)
    return (
        {t.name: t.head for t in context.tasks},
        {t.name: t.classes for t in context.tasks},
    )
