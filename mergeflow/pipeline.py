"""The merge pipeline's steps as plain functions (Prefect tasks wrap them in ``tasks/``).

Steps exchange URIs and small dicts. Heavy intermediate results live in the result store
(:mod:`mergeflow.results`: ``$MERGEFLOW_RESULT_STORE``, else the local cache), keyed by the
content they come from: CART factors by the digests of the checkpoints and the factorization
settings, data-aware merges by the checkpoints, method, parameters and samples, and scores
by the candidate's recipe key and the evaluation data's digest. Prepared images stay in the
local cache, keyed by the data's digest and the transform. Within one process the evaluation
context (model, heads, prepared images) is built once and reused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergeflow.cart_grid import FORMAT as FACTORS_FORMAT
from mergeflow.cart_grid import CartFactors
from mergeflow.checkpoints import (
    load_state_dict,
    open_checkpoint,
    open_checkpoints,
    save_state_dict,
)
from mergeflow.data_aware import DataAwareInputs, DataAwareMethod, TaskSamples
from mergeflow.errors import ParameterError
from mergeflow.evaluation import (
    ADAPTATION,
    REPORT,
    SELECTION,
    PreparedTask,
    accuracy,
    prepare_tasks,
    score_all,
    summarize,
)
from mergeflow.hf_clip import from_open_clip, is_hf_clip, to_open_clip
from mergeflow.kernels import DEFAULT_RANK_RATIO
from mergeflow.memory import release_large_frees
from mergeflow.merge import merge_readers
from mergeflow.methods import find_method, get_method
from mergeflow.models import create_model, resolve_model
from mergeflow.results import ResultStore
from mergeflow.sources import resolve_checkpoint
from mergeflow.spec import MergeSpec
from mergeflow.statedict import StateDict
from mergeflow.storage import CheckpointCache
from mergeflow.svd import resolve_device

log = logging.getLogger(__name__)


def _content_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


def checkpoint_digests(spec: MergeSpec, cache: CheckpointCache) -> dict[str, str]:
    """sha256 of the base and every task checkpoint, by URI (fetched through the cache; a
    folder's or adapter's from all its weight files, see :mod:`mergeflow.sources`). An
    adapter's digest includes the base's: its weights are the base plus its delta."""
    base = resolve_checkpoint(spec.base, cache).digest(cache)
    digests = {spec.base: base}
    for t in spec.tasks:
        source = resolve_checkpoint(t.checkpoint, cache)
        digest = source.digest(cache)
        if source.kind == "lora":
            digest = _content_key("lora-over/1", digest, base)
        digests[t.checkpoint] = digest
    return digests


def task_readers(spec: MergeSpec, cache: CheckpointCache):
    """A context of (base reader, the tasks' readers), closed on exit (adapters read over
    the base)."""
    return open_checkpoints([t.checkpoint for t in spec.tasks], spec.base, cache)


def load_task_state(spec: MergeSpec, cache: CheckpointCache, uri: str) -> StateDict:
    """All tensors of one of the spec's task checkpoints (an adapter's over the base)."""
    with open_checkpoint(spec.base, cache) as base:
        return load_state_dict(uri, cache, base=base)


@dataclass
class EvaluationContext:
    """What scoring needs that no candidate changes: one model, heads, prepared splits, and
    the base's weights (in its own names), which complete a candidate that lacks some."""

    spec: MergeSpec
    model: torch.nn.Module
    tasks: list[PreparedTask]
    base: StateDict = field(default_factory=dict, repr=False)
    # one model object serves every candidate: threads of one process take turns with it
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def complete(self, state: StateDict) -> StateDict:
        """``state`` plus every base tensor it lacks (a vision-only fine-tune's text tower)."""
        missing = [k for k in self.base if k not in state]
        return {**state, **{k: self.base[k] for k in missing}} if missing else state

    def score(
        self, state: StateDict, split: str = SELECTION, only: str | None = None
    ) -> dict[str, float]:
        """Per-task accuracy of ``state`` (open_clip or transformers CLIP names; missing
        tensors taken from the base) on ``split`` (of task ``only``, if given)."""
        tasks = [t for t in self.tasks if only in (None, t.name)]
        weights = to_open_clip(self.complete(state))
        with self.lock:
            self.model.load_state_dict(weights)
            return score_all(self.model, tasks, split, self.spec.batch_size, self.spec.device)

    def data_digest(self, split: str, only: str | None = None) -> str:
        """Digest of what scores on ``split`` depend on besides the weights: each task's
        prepared images and labels and its zero-shot head."""
        parts = [
            (
                t.name,
                t.splits[split].digest,
                hashlib.sha256(t.head.float().contiguous().numpy().tobytes()).hexdigest(),
            )
            for t in self.tasks
            if only in (None, t.name)
        ]
        return _content_key("evaluation/1", parts)


@functools.lru_cache(maxsize=4)
def _context(spec_json: str, cache_root: str) -> EvaluationContext:
    spec = MergeSpec.model_validate_json(spec_json)
    cache = CheckpointCache(cache_root)
    base = load_state_dict(spec.base, cache)
    architecture = resolve_model(spec.model)
    check_text_tower(base, spec.base)
    tasks = prepare_tasks(spec.tasks, architecture, base, cache)
    return EvaluationContext(spec, create_model(architecture, base), tasks, base)


def check_text_tower(base: StateDict, uri: str) -> None:
    """The zero-shot heads come from the base's text tower: a base without one (the
    task-vectors papers' ``zeroshot.pt`` deletes it) is refused, saying what to give."""
    names = to_open_clip(base)
    missing = [
        k
        for k in (
            "token_embedding.weight",
            "transformer.resblocks.0.attn.in_proj_weight",
            "text_projection",
        )
        if k not in names
    ]
    if missing:
        raise ParameterError(
            f"base {uri}: has no text tower (no {missing[0]!r}); the zero-shot heads are "
            "computed from it: give as base the whole pre-trained CLIP (e.g. open_clip's "
            "checkpoint of the same model), whose image tower the tasks were fine-tuned from"
        )


def evaluation_context(spec: MergeSpec, cache: CheckpointCache) -> EvaluationContext:
    return _context(spec.model_dump_json(), str(cache.root))


def check_bases(spec: MergeSpec, cache: CheckpointCache) -> dict[str, float]:
    """Each task's ‖θ_t − θ₀‖ / ‖θ₀‖ (kept in the result store by the checkpoints' digests);
    a task beyond ``spec.max_base_distance`` is refused or warned about per
    ``spec.base_check``."""
    from mergeflow.checks import relative_distance

    if spec.base_check == "off":
        return {}
    digests = checkpoint_digests(spec, cache)
    store = ResultStore(cache)
    distances = {}
    with open_checkpoint(spec.base, cache) as base:
        for t in spec.tasks:
            key = _content_key("base-distance/1", digests[spec.base], digests[t.checkpoint])
            record = store.read_json("checks", key)
            if record is None:
                with open_checkpoint(t.checkpoint, cache, base=base) as tuned:
                    record = {"distance": relative_distance(base, tuned)}
                store.write_json("checks", key, record)
            distances[t.name] = record["distance"]
    far = {name: d for name, d in distances.items() if d > spec.max_base_distance}
    for name, distance in far.items():
        task = next(t for t in spec.tasks if t.name == name)
        message = (
            f"task {name!r}: {task.checkpoint} lies {distance:.3f} (relative L2) from the base "
            f"{spec.base}, beyond max_base_distance {spec.max_base_distance}: it was probably "
            "not fine-tuned from this base"
        )
        if spec.base_check == "refuse":
            raise ParameterError(message + " (set base_check: warn to merge it anyway)")
        log.warning(message)
    return distances


def factors_key(spec: MergeSpec, cache: CheckpointCache) -> str:
    digests = checkpoint_digests(spec, cache)
    max_ratio = max(spec.grid.rank_ratios)
    return _content_key(FACTORS_FORMAT, [digests[t.checkpoint] for t in spec.tasks], max_ratio)


def factorize(spec: MergeSpec, cache: CheckpointCache) -> str:
    """CART factors of the spec's checkpoints up to its largest rank ratio, kept in the
    result store keyed by the checkpoints' digests; an existing file with that key is
    reused. Returns a local path whose file name is the key."""

    def build(uri: str) -> None:
        release_large_frees()
        with task_readers(spec, cache) as (_, readers):
            factors = CartFactors.factorize(
                readers, max_rank_ratio=max(spec.grid.rank_ratios), device=spec.device
            )
        factors.save(uri)

    store = ResultStore(cache)
    return store.file("factors", f"{factors_key(spec, cache)}.safetensors", build)


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


def _data_aware_key(spec: MergeSpec, cache: CheckpointCache, candidate: dict) -> str:
    method = find_method(candidate["method"])
    params = method.parse_params(candidate.get("params", {}))
    digests = checkpoint_digests(spec, cache)
    samples_from = [
        (t.dataset.uri, t.dataset.adaptation_split or t.dataset.selection_split) for t in spec.tasks
    ]
    return _content_key(
        "data-aware/1",
        [digests[spec.base]] + [digests[t.checkpoint] for t in spec.tasks],
        method.name,
        params.model_dump(mode="json"),
        samples_from,
    )


def data_aware_weights(spec: MergeSpec, cache: CheckpointCache, candidate: dict) -> tuple[str, str]:
    """Run a data-aware method once per (checkpoints, method, params, samples) and keep its
    merged weights, with what it learned in the file's metadata, in the result store:
    (store URI, local path)."""
    store = ResultStore(cache)
    name = f"{_data_aware_key(spec, cache, candidate)}.safetensors"
    path = store.file("adapted", name, lambda uri: _run_data_aware(spec, cache, candidate, uri))
    return store.uri("adapted", name), path


def _run_data_aware(spec: MergeSpec, cache: CheckpointCache, candidate: dict, uri: str) -> None:
    method = find_method(candidate["method"])
    params = method.parse_params(candidate.get("params", {}))
    context = evaluation_context(spec, cache)
    samples = []
    for t in context.tasks:
        images = t.splits[ADAPTATION].images
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        samples.append(TaskSamples(t.name, images[order], t.head))
    # the methods run open_clip's model, so they see whole models under open_clip's names
    finetuned = [load_task_state(spec, cache, t.checkpoint) for t in spec.tasks]
    native_hf = is_hf_clip(finetuned[0])
    inputs = DataAwareInputs(
        model=create_model(resolve_model(spec.model), context.base),
        base=to_open_clip(context.base),
        finetuned=[to_open_clip(context.complete(state)) for state in finetuned],
        samples=samples,
        device=resolve_device(spec.device),
    )
    del finetuned
    outcome = method.run(inputs, params)
    state = from_open_clip(outcome.state) if native_hf else outcome.state
    save_state_dict(
        state, uri, {"mergeflow.method": method.name, "mergeflow.info": json.dumps(outcome.info)}
    )


def adaptation_info(spec: MergeSpec, cache: CheckpointCache, candidate: dict) -> dict:
    """What a data-aware candidate learned (coefficients, entropies, ...), from its file."""
    _, path = data_aware_weights(spec, cache, candidate)
    with open_checkpoint(path) as reader:
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
    with task_readers(spec, cache) as (base, readers):
        return merge_readers(merge_method, readers, base, parsed, device=spec.device)


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
        uri = next(t.checkpoint for t in spec.tasks if t.name == task)
        state = load_task_state(spec, cache, uri)
    elif is_data_aware(method):
        state = load_state_dict(data_aware_weights(spec, cache, candidate)[1])
    elif method == "cart" and factors_path is not None and set(params) <= {"rank_ratio", "scale"}:
        state = grid_point_state(
            factors_path,
            params.get("rank_ratio", DEFAULT_RANK_RATIO),
            params.get("scale", 1.0),
            spec.device,
        )
    else:
        state = merge_state(spec, cache, method, params, task)
    # a whole model, as the merge of a vision-only fine-tune keeps the base's other tensors
    return evaluation_context(spec, cache).complete(state)


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

    def build(uri: str) -> None:
        with task_readers(spec, cache) as (_, readers):
            index = CartIndex.build(
                readers,
                [t.name for t in spec.tasks],
                rank_ratio=spec.compression.rank_ratio,
                energy=spec.compression.energy,
                device=spec.device,
            )
        index.save(uri)

    return ResultStore(cache).file("indexes", f"{key}.safetensors", build)


def index_complement(spec: MergeSpec, cache: CheckpointCache, path: str) -> StateDict:
    """The base's tensors that the CART index at ``path`` does not hold (for a vision-only
    fine-tune: the text tower), which a model rebuilt from it needs."""
    held = load_index(path).average
    return {k: v for k, v in evaluation_context(spec, cache).base.items() if k not in held}


@functools.lru_cache(maxsize=2)
def load_index(path: str):
    from mergeflow.cart_index import CartIndex

    return CartIndex.load(path)


def checkpoint_bytes(spec: MergeSpec, cache: CheckpointCache) -> int:
    """Bytes of the spec's fine-tuned checkpoints' tensors."""
    total = 0
    with task_readers(spec, cache) as (_, readers):
        for reader in readers:
            total += sum(
                math.prod(shape) * dtype.itemsize for shape, dtype in reader.layout().values()
            )
    return total


def candidate_key(
    spec: MergeSpec,
    cache: CheckpointCache,
    candidate: dict,
    factors_path: str | None = None,
    task: str | None = None,
) -> str:
    """A digest naming the weights of a candidate by what they are computed from (the
    checkpoints' digests, the method and its parsed parameters, or the factors file they
    come from): two candidates with one key have the same weights."""
    method, params = candidate["method"], candidate.get("params", {})
    digests = checkpoint_digests(spec, cache)
    if method == "zeroshot":
        return _content_key("model/1", "zeroshot", digests[spec.base])
    if method == "finetuned":
        uri = next(t.checkpoint for t in spec.tasks if t.name == task)
        return _content_key("model/2", "finetuned", digests[uri], digests[spec.base])
    if is_data_aware(method):
        return _content_key("model/1", "data-aware", _data_aware_key(spec, cache, candidate))
    if method == "cart" and factors_path is not None and set(params) <= {"rank_ratio", "scale"}:
        point = (params.get("rank_ratio", DEFAULT_RANK_RATIO), params.get("scale", 1.0))
        stem = Path(factors_path).stem
        return _content_key("model/2", "cart-factors", stem, point, digests[spec.base])
    merge_method = get_method(method)
    if merge_method.per_task:
        params = {**params, "task": [t.name for t in spec.tasks].index(task)}
    parsed = merge_method.parse_params(params)
    # the base always counts: tensors only it holds are carried into every merge
    inputs = [digests[t.checkpoint] for t in spec.tasks] + [digests[spec.base]]
    return _content_key("model/2", method, parsed.model_dump(mode="json"), inputs)


def merged_weights(
    spec: MergeSpec, cache: CheckpointCache, candidate: dict, factors_path: str | None = None
) -> tuple[str, str]:
    """The candidate's merged weights, kept in the result store before anything is sent to
    the registry (so a registry that is down loses nothing): (store URI, local path)."""
    store = ResultStore(cache)
    name = f"{candidate_key(spec, cache, candidate, factors_path)}.safetensors"

    def build(uri: str) -> None:
        state = candidate_state(spec, cache, candidate, factors_path)
        params = json.dumps(candidate.get("params", {}), sort_keys=True)
        save_state_dict(
            state, uri, {"mergeflow.method": candidate["method"], "mergeflow.params": params}
        )

    return store.uri("models", name), store.file("models", name, build)


def registration_key(name: str, model_key: str) -> str:
    """What makes registering idempotent: one registry version per (name, model)."""
    return _content_key("registration/1", name, model_key)


def cached_scores(
    spec: MergeSpec,
    cache: CheckpointCache,
    model_key: str,
    split: str,
    compute,
    only: str | None = None,
) -> dict[str, float]:
    """Scores of the model named ``model_key`` on ``split`` (of task ``only``), from the
    result store when they were computed before on the same data, else ``compute()``d
    and stored."""
    context = evaluation_context(spec, cache)
    key = _content_key("scores/1", model_key, split, context.data_digest(split, only))
    store = ResultStore(cache)
    record = store.read_json("scores", key)
    if record is not None:
        # the record's keys are sorted; give them back in the spec's task order
        return {t.name: record["accuracy"][t.name] for t in context.tasks if only in (None, t.name)}
    accuracy = compute()
    store.write_json("scores", key, {"accuracy": accuracy, "model": model_key, "split": split})
    return accuracy


def score_candidate(
    spec: MergeSpec,
    cache: CheckpointCache,
    candidate: dict,
    split: str = SELECTION,
    factors_path: str | None = None,
) -> dict[str, float]:
    """Per-task accuracy of a candidate on a split, through the score cache. Candidates that
    are one model per task (finetuned, tall_masks, cart_indexed) score each task's own model
    on that task only."""
    context = evaluation_context(spec, cache)
    one_per_task = candidate["method"] == "finetuned" or is_per_task(candidate["method"])
    scores = {}
    for task in [t.name for t in spec.tasks] if one_per_task else [None]:
        key = candidate_key(spec, cache, candidate, factors_path, task)

        def compute(task=task):
            state = candidate_state(spec, cache, candidate, factors_path, task=task)
            return context.score(state, split, only=task)

        scores.update(cached_scores(spec, cache, key, split, compute, only=task))
    return scores


def score_grid_point(
    spec: MergeSpec, cache: CheckpointCache, factors_path: str, rank_ratio: float, scale: float
) -> dict[str, float]:
    candidate = {"method": "cart", "params": {"rank_ratio": rank_ratio, "scale": scale}}
    return score_candidate(spec, cache, candidate, SELECTION, factors_path)


def score_index(
    spec: MergeSpec, cache: CheckpointCache, path: str, split: str = REPORT
) -> dict[str, float]:
    """Each task's model rebuilt from the CART index at ``path``, scored on that task."""
    context = evaluation_context(spec, cache)
    scores = {}
    for t in spec.tasks:
        key = _content_key("model/1", "cart-index", Path(path).stem, t.name)

        def compute(task=t.name):
            return context.score(load_index(path).rebuild(task, spec.device), split, only=task)

        scores.update(cached_scores(spec, cache, key, split, compute, only=t.name))
    return scores


def report_digest(spec: MergeSpec, cache: CheckpointCache) -> str:
    """Digest of the report data (images, labels, heads of every task): two scores are
    comparable when they were taken on data with one digest."""
    return evaluation_context(spec, cache).data_digest(REPORT)


def registered_model_scores(
    spec: MergeSpec, cache: CheckpointCache, model_uri: str, split: str = REPORT
) -> dict[str, float]:
    """Per-task accuracy on ``split`` of a model loaded from the MLflow registry
    (``models:/NAME@champion``, ``models:/NAME/3``), with its own heads and weights."""
    from mergeflow.registry import load_registered_model

    model = load_registered_model(model_uri)
    # versions logged before the model kept its config name do not say; their forward pass
    # fails on images of the wrong size instead
    config = getattr(model, "config", spec.model)
    if config != spec.model:
        raise ParameterError(
            f"{model_uri} is a {config} model; the spec's tasks are prepared for {spec.model}"
        )
    context = evaluation_context(spec, cache)
    missing = [t.name for t in context.tasks if t.name not in model.heads]
    if missing:
        raise ParameterError(f"{model_uri} has no head for the spec's task(s) {missing}")
    scores = {}
    for t in context.tasks:
        model._use_task(t.name)
        own_head = dataclasses.replace(t, head=model.heads[t.name])
        scores[t.name] = accuracy(model.model, own_head, split, spec.batch_size, spec.device)
    return scores


def summary_of(
    spec: MergeSpec, cache: CheckpointCache, scores: dict[str, float], split: str = REPORT
) -> dict:
    """``scores`` summarized against the fine-tuned models' scores on the same split (NaN
    normalized accuracy when the spec has no fine-tuned reference)."""
    if spec.has_reference("finetuned"):
        finetuned = {"method": "finetuned", "params": {}}
        reference = score_candidate(spec, cache, finetuned, split)
    else:
        reference = {t.name: math.nan for t in spec.tasks}
    return summarize(scores, reference)


def heads_and_classes(spec: MergeSpec, cache: CheckpointCache):
    context = evaluation_context(spec, cache)
    return (
        {t.name: t.head for t in context.tasks},
        {t.name: t.classes for t in context.tasks},
    )
