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
from dataclasses import dataclass

import torch

from mergeflow.cart_grid import CartFactors
from mergeflow.checkpoints import load_state_dict, open_checkpoint
from mergeflow.evaluation import REPORT, SELECTION, PreparedTask, prepare_tasks, score_all
from mergeflow.merge import merge_readers
from mergeflow.models import create_model
from mergeflow.spec import MergeSpec
from mergeflow.statedict import StateDict
from mergeflow.storage import CheckpointCache

log = logging.getLogger(__name__)


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
    key = hashlib.sha256(
        json.dumps([[digests[t.checkpoint] for t in spec.tasks], max_ratio]).encode()
    ).hexdigest()[:40]
    path = cache.root / "factors" / f"{key}.safetensors"
    if path.is_file():
        log.info("reusing CART factors %s", path)
        return str(path)
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


def baseline_state(spec: MergeSpec, baseline: str, cache: CheckpointCache) -> StateDict:
    """The weights of a baseline: ``average``, ``task_arithmetic``, ``zeroshot`` (the base)
    or ``finetuned:TASK``."""
    if baseline == "zeroshot":
        return load_state_dict(spec.base, cache)
    if baseline.startswith("finetuned:"):
        task = baseline.split(":", 1)[1]
        uri = next(t.checkpoint for t in spec.tasks if t.name == task)
        return load_state_dict(uri, cache)
    readers = [open_checkpoint(t.checkpoint, cache) for t in spec.tasks]
    base = open_checkpoint(spec.base, cache)
    params = {"scale": spec.task_arithmetic_scale} if baseline == "task_arithmetic" else {}
    try:
        return merge_readers(baseline, readers, base, params, device=spec.device)
    finally:
        for reader in readers + [base]:
            reader.close()


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
