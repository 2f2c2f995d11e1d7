"""One pipeline run's resolved inputs: the spec, the checkpoints' digests (resolved once),
the local cache and the result store.

:class:`RunInputs` is what crosses a Prefect task boundary (the spec, a digest per URI, the
cache folder: small, serializable); :func:`open_run` turns it into a :class:`Run` once per
process, which holds what every step shares: the stores, the evaluation context (model,
heads, prepared images) and the CART factors.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from mergeflow.checkpoints import load_state_dict, open_checkpoint, open_checkpoints
from mergeflow.errors import ParameterError
from mergeflow.results import ResultStore
from mergeflow.sources import resolve_checkpoint, source_digests
from mergeflow.spec import MergeSpec
from mergeflow.statedict import StateDict
from mergeflow.storage import CheckpointCache


def content_key(*parts) -> str:
    """A digest of ``parts`` (JSON, keys sorted): what names a result in the store."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def combine_digests(spec: MergeSpec, sources: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """The digest naming each checkpoint's weights, by URI, from each source's ``(kind,
    sha256)`` (as fetching reports them): an adapter's weights are the base plus its delta,
    so its digest covers the base's too."""
    uris = [spec.base] + [t.checkpoint for t in spec.tasks]
    missing = [uri for uri in uris if uri not in sources]
    if missing:
        raise ParameterError(f"no digest for checkpoint {missing[0]}: fetch it first")
    base = sources[spec.base][1]
    digests = {spec.base: base}
    for t in spec.tasks:
        digests[t.checkpoint] = weights_digest(*sources[t.checkpoint], base)
    return digests


def weights_digest(kind: str, digest: str, base_digest: str) -> str:
    """The digest naming a fine-tuned checkpoint's weights: its own, but an adapter's
    weights are the base plus its delta, so its digest covers the base's too."""
    return content_key("lora-over/1", digest, base_digest) if kind == "lora" else digest


def resolve_digests(spec: MergeSpec, cache: CheckpointCache) -> dict[str, str]:
    """:func:`combine_digests` of the spec's checkpoints, fetched through ``cache``."""
    uris = [spec.base] + [t.checkpoint for t in spec.tasks]
    sources = [resolve_checkpoint(uri, cache) for uri in uris]
    digests = source_digests(sources, cache)
    return combine_digests(
        spec, {uri: (s.kind, d) for uri, s, d in zip(uris, sources, digests, strict=True)}
    )


class RunInputs(BaseModel):
    """What a pipeline step needs to find everything else: the spec, the digest of each of
    its checkpoints (by URI) and the local cache folder (None: the default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: MergeSpec
    digests: dict[str, str]
    cache_dir: str | None = None

    @classmethod
    def resolve(cls, spec: MergeSpec, cache_dir: str | None = None) -> RunInputs:
        """The inputs with the digests looked up now (T + 1 fetches through the cache)."""
        return cls(
            spec=spec,
            digests=resolve_digests(spec, CheckpointCache(cache_dir)),
            cache_dir=cache_dir,
        )


class Run:
    """The shared state of one run in one process: use :func:`open_run`."""

    def __init__(self, inputs: RunInputs):
        self.inputs = inputs
        self.spec = inputs.spec
        self.cache = CheckpointCache(inputs.cache_dir)
        self.store = ResultStore(self.cache)
        self.digests = dict(inputs.digests)

    @property
    def base_digest(self) -> str:
        return self.digests[self.spec.base]

    @property
    def task_digests(self) -> list[str]:
        """The task checkpoints' digests, in the spec's task order."""
        return [self.digests[t.checkpoint] for t in self.spec.tasks]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.spec.tasks]

    def checkpoint_of(self, task: str) -> str:
        return next(t.checkpoint for t in self.spec.tasks if t.name == task)

    def task_readers(self):
        """A context of (base reader, the tasks' readers), closed on exit (adapters read
        over the base)."""
        return open_checkpoints([t.checkpoint for t in self.spec.tasks], self.spec.base, self.cache)

    def load_task_state(self, task: str) -> StateDict:
        """All tensors of ``task``'s checkpoint (an adapter's over the base)."""
        with open_checkpoint(self.spec.base, self.cache) as base:
            return load_state_dict(self.checkpoint_of(task), self.cache, base=base)

    def load_base(self) -> StateDict:
        return load_state_dict(self.spec.base, self.cache)

    def factors_key(self) -> str:
        """Names the CART factors of these checkpoints up to the grid's largest rank."""
        from mergeflow.cart_grid import FORMAT

        return content_key(FORMAT, self.task_digests, max(self.spec.grid.rank_ratios))

    def factors_path(self) -> str:
        """A local path of the CART factors (one SVD per matrix and task, up to the grid's
        largest rank ratio): from the result store, else computed now and stored."""
        from mergeflow.cart_grid import CartFactors
        from mergeflow.memory import release_large_frees

        def build(uri: str) -> None:
            release_large_frees()
            with self.task_readers() as (_, readers):
                factors = CartFactors.factorize(
                    readers, max_rank_ratio=max(self.spec.grid.rank_ratios), device=self.spec.device
                )
            factors.save(uri)

        return self.store.file("factors", f"{self.factors_key()}.safetensors", build)

    def factors(self):
        """The loaded :class:`~mergeflow.cart_grid.CartFactors` (built if need be)."""
        return _load_factors(self.factors_path())

    def index_path(self) -> str:
        """A local path of the spec's CART index (compression), built once per checkpoints
        and settings."""
        from mergeflow.cart_index import FORMAT, CartIndex

        compression = self.spec.compression
        if compression is None:
            raise ParameterError("the spec asks for no compression (no CART index)")
        key = content_key(
            FORMAT,
            self.task_digests,
            self.task_names,
            compression.model_dump(exclude={"register_model"}),
        )

        def build(uri: str) -> None:
            with self.task_readers() as (_, readers):
                index = CartIndex.build(
                    readers,
                    self.task_names,
                    rank_ratio=compression.rank_ratio,
                    energy=compression.energy,
                    device=self.spec.device,
                )
            index.save(uri)

        return self.store.file("indexes", f"{key}.safetensors", build)

    @property
    def context(self):
        """The evaluation context (model, heads, prepared splits), built once per process."""
        from mergeflow.evaluation import evaluation_context

        return evaluation_context(self.spec, self.cache)


@functools.lru_cache(maxsize=2)
def _load_factors(path: str):
    from mergeflow.cart_grid import CartFactors

    return CartFactors.load(path)


@functools.lru_cache(maxsize=2)
def load_index(path: str):
    """The :class:`~mergeflow.cart_index.CartIndex` at ``path``, once per process."""
    from mergeflow.cart_index import CartIndex

    return CartIndex.load(path)


@functools.lru_cache(maxsize=8)
def _open(inputs_json: str) -> Run:
    return Run(RunInputs.model_validate_json(inputs_json))


def open_run(inputs: RunInputs) -> Run:
    """The :class:`Run` of ``inputs``, one per process and inputs."""
    return _open(inputs.model_dump_json())
