"""Run a merge method over checkpoints, one tensor at a time.

Nothing holds the whole output: :func:`merge_files` writes each merged tensor to its file as
it comes, so peak memory is, for the key being merged, one tensor (or one row block) per input
and the method's temporaries.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from mergeflow.architectures import describe
from mergeflow.checkpoints import (
    CheckpointReader,
    load_for_compute,
    lora_adapters,
    open_checkpoints,
)
from mergeflow.errors import ParameterError
from mergeflow.lora import save_lora_adapter
from mergeflow.methods import MergeMethod, MethodParams, get_method
from mergeflow.methods.cart import LowRankSelection
from mergeflow.outputs import (
    DEFAULT_SHARD_SIZE,
    ModelFolder,
    Recipe,
    StreamedOutput,
    aligned_order,
    companion_files,
    is_folder_output,
    layout_bytes,
)
from mergeflow.sources import source_digests
from mergeflow.statedict import COMPUTE_DTYPE, Layout, StateDict, check_same_layout
from mergeflow.storage import CheckpointCache
from mergeflow.svd import resolve_device

log = logging.getLogger(__name__)


def common_layout(readers: Sequence[CheckpointReader]) -> Layout:
    """The layout every reader shares; the error names the key and the two checkpoints."""
    reference = readers[0].layout()
    for other in readers[1:]:
        check_same_layout(reference, other.layout(), readers[0].name, other.name)
    return reference


def check_base_layout(layout: Layout, base: CheckpointReader, tuned_name: str) -> Layout:
    """The base must hold every fine-tuned key with the same shape and dtype; it may hold
    more (a vision-only fine-tune of a whole CLIP). Returns the keys only the base holds."""
    base_layout = base.layout()
    check_same_layout(
        layout, {k: base_layout[k] for k in layout if k in base_layout}, tuned_name, base.name
    )
    return {k: v for k, v in base_layout.items() if k not in layout}


@dataclass
class MergeCounts:
    """How a merge treated the tensors: low-rank (selected matrices of a low-rank method),
    element-wise (every other floating tensor it merged), copied (integer buffers and
    tensors no task changed) and taken from the base (keys no fine-tuned checkpoint holds)."""

    low_rank: int = 0
    element_wise: int = 0
    copied: int = 0
    from_base: int = 0

    def describe(self) -> str:
        parts = [f"{self.low_rank} low-rank"] if self.low_rank else []
        parts += [f"{self.element_wise} element-wise", f"{self.copied} copied unchanged"]
        if self.from_base:
            parts.append(f"{self.from_base} from the base only")
        return ", ".join(parts)


ROW_BLOCK_BYTES = 16 * 2**20
"""float32 bytes of one input's row block: an element-wise method merges a larger tensor
block by block, so a key's T + 1 inputs and the method's temporaries stay a few blocks."""


def merge_readers(
    method: str | MergeMethod,
    finetuned: Sequence[CheckpointReader],
    base: CheckpointReader | None = None,
    params: Mapping[str, Any] | MethodParams | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = False,
) -> StateDict:
    """Merge ``finetuned`` with ``method`` key by key and return the merged state dict in
    memory (see :func:`start_merge`)."""
    return dict(start_merge(method, finetuned, base, params, device, progress).tensors())


def start_merge(
    method: str | MergeMethod,
    finetuned: Sequence[CheckpointReader],
    base: CheckpointReader | None = None,
    params: Mapping[str, Any] | MethodParams | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = False,
    out_dtype: torch.dtype | None = None,
) -> StreamedMerge:
    """Check the inputs, run the method's statistics passes, and return the merge ready to
    stream: its output layout first, then its tensors one key at a time.

    Floating tensors are merged in float32 on ``device`` and returned on the CPU in the
    inputs' dtype (or ``out_dtype``). Non-floating tensors (integer buffers) are carried from
    the base, or from the first fine-tuned checkpoint when there is no base; so is every
    tensor that no checkpoint changed (all inputs equal: every method's fixed point), and
    every key only the base holds. Methods that need model-wide statistics first stream over
    the checkpoints (``MergeMethod.prepare``); either way no more than one key's tensors per
    input are held (an element-wise method's large tensors: one row block's). A low-rank
    method that selects no matrix is refused.
    """
    method = get_method(method) if isinstance(method, str) else method
    parsed = method.parse_params(params)
    if not finetuned:
        raise ParameterError("no fine-tuned checkpoints given")
    if method.needs_base(parsed) and base is None:
        raise ParameterError(f"method {method.name!r} needs a base checkpoint")
    if method.merge_factors is not None and len(lora_adapters(finetuned)) != len(finetuned):
        plain = next(r.name for r in finetuned if not hasattr(r, "adapter"))
        raise ParameterError(
            f"method {method.name!r} merges LoRA adapters as factors: {plain} is not a PEFT adapter"
        )
    layout = common_layout(finetuned)
    base_only = check_base_layout(layout, base, finetuned[0].name) if base is not None else {}
    if isinstance(parsed, LowRankSelection) and not any(
        parsed.selects(k, shape) for k, (shape, dtype) in layout.items() if dtype.is_floating_point
    ):
        raise ParameterError(
            f"method {method.name!r} selects no weight matrix of {finetuned[0].name} "
            f"({parsed.describe_rule()}; architecture: {describe(layout)}): name the "
            "matrices with include=REGEX"
        )
    merge = StreamedMerge(
        method,
        parsed,
        finetuned,
        base,
        layout,
        base_only,
        resolve_device(device),
        progress,
        out_dtype,
    )
    merge.prepare()
    return merge


class StreamedMerge:
    """A merge ready to run (made by :func:`start_merge`). ``layout`` is the output's key →
    (shape, dtype), known before any tensor is merged, so a writer can plan its files;
    :meth:`tensors` merges and yields one key at a time and fills ``counts``."""

    def __init__(
        self,
        method: MergeMethod,
        params: MethodParams,
        finetuned: Sequence[CheckpointReader],
        base: CheckpointReader | None,
        layout: Layout,
        base_only: Layout,
        device: torch.device,
        progress: bool,
        out_dtype: torch.dtype | None,
    ):
        self.method, self.params = method, params
        self._finetuned, self._base = list(finetuned), base
        self._uses_base = method.needs_base(params)
        self._inputs = layout
        self._base_only = base_only
        self._device = device
        self._progress = progress
        self._elementwise = method.merges_elementwise(params)
        self._low_rank = isinstance(params, LowRankSelection)
        self._context = None
        self.counts = MergeCounts()
        self.layout: Layout = {
            key: (shape, (out_dtype or dtype) if dtype.is_floating_point else dtype)
            for key, (shape, dtype) in layout.items()
        }
        self.layout.update(base_only)

    def _blocks(self, key: str) -> list[tuple[int, int] | None]:
        """Row ranges to merge ``key`` in: one (None, the whole tensor) unless the method is
        element-wise and the tensor is larger than a block."""
        shape, _ = self._inputs[key]
        numel = math.prod(shape)
        if not self._elementwise or not shape or numel * 4 <= ROW_BLOCK_BYTES:
            return [None]
        rows = max(1, ROW_BLOCK_BYTES // (4 * (numel // shape[0])))
        return [(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)]

    def _load(self, key: str, rows: tuple[int, int] | None):
        tensors = [
            load_for_compute(r, key, self._device, COMPUTE_DTYPE, rows) for r in self._finetuned
        ]
        base = (
            load_for_compute(self._base, key, self._device, COMPUTE_DTYPE, rows)
            if self._uses_base
            else None
        )
        return tensors, base

    def prepare(self) -> None:
        """The method's statistics passes over the checkpoints (methods with ``prepare``),
        or its plan from the layout alone (``plan``)."""
        if self.method.plan is not None:
            self._context = self.method.plan(self._inputs, self.params)
        if self.method.prepare is None:
            return
        floating = [k for k, (_, dtype) in self._inputs.items() if dtype.is_floating_point]
        passes = 0

        def sweep():
            nonlocal passes
            passes += 1
            desc = f"{self.method.name} statistics, pass {passes}"
            for key in tqdm(floating, desc=desc, disable=not self._progress):
                for rows in self._blocks(key):
                    yield (key, *self._load(key, rows))

        self._context = self.method.prepare(sweep, self.params)
        log.info("%s: %d statistics passes over the checkpoints", self.method.name, passes)

    def tensors(self, order: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, merged tensor on the CPU) for every key of ``layout``, in ``order``."""
        keys = list(self.layout) if order is None else list(order)
        if sorted(keys) != sorted(self.layout):
            raise ValueError("the order must name every key of the merge's layout once")
        bar = tqdm(
            keys, desc=f"merge {self.method.name}", unit="tensor", disable=not self._progress
        )
        for key in bar:
            yield key, self._merge_key(key)
        log.info(
            "%s merge of %d checkpoints: %s",
            self.method.name,
            len(self._finetuned),
            self.counts.describe(),
        )

    def _merge_key(self, key: str) -> torch.Tensor:
        carrier = self._base if self._base is not None else self._finetuned[0]
        if key in self._base_only:
            self.counts.from_base += 1
            return self._base.get(key).clone()
        shape, dtype = self._inputs[key]
        if not dtype.is_floating_point:
            self.counts.copied += 1
            return carrier.get(key).clone()
        target = self.layout[key][1]
        factored = self._factors(key)
        if factored is not None:  # LoRA targets merged as factors: no dense ΔW_t is made
            base = load_for_compute(self._base, key, self._device, COMPUTE_DTYPE)
            merged = self.method.merge_factors(key, factored, base, self.params, self._context)
            self.counts.low_rank += 1
            return merged.to(target).cpu()
        blocks = self._blocks(key)
        out = None if blocks == [None] else torch.empty(shape, dtype=target)
        changed = False
        for rows in blocks:
            tensors, base = self._load(key, rows)
            if all(torch.equal(tensors[0], t) for t in tensors[1:]) and (
                base is None or torch.equal(tensors[0], base)
            ):
                merged = tensors[0]  # no task changed these entries: every method's fixed point
            else:
                merged = self.method.merge_tensor(key, tensors, base, self.params, self._context)
                changed = True
            if out is None:
                out = merged.to(target).cpu()
            else:
                out[rows[0] : rows[1]] = merged.to(target).cpu()
        if not changed:
            self.counts.copied += 1
        elif self._low_rank and self.params.selects(key, shape):
            self.counts.low_rank += 1
        else:
            self.counts.element_wise += 1
        return out

    def _factors(self, key: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Every input's (B, A) of ``key`` on the device, for a method that merges factors
        and a key every input holds as factors; else None."""
        if self.method.merge_factors is None:
            return None
        factors = [r.low_rank_factors(key) for r in self._finetuned]
        if any(f is None for f in factors):
            return None
        return [(b.to(self._device), a.to(self._device)) for b, a in factors]


@dataclass(frozen=True)
class MergeReport:
    method: str
    params: dict
    out: str
    num_tensors: int
    num_bytes: int
    seconds: float
    counts: MergeCounts = field(default_factory=MergeCounts)
    files: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


OUT_FORMATS = ("full", "lora")


def merge_files(
    method: str,
    base: str | os.PathLike | None,
    finetuned: Sequence[str | os.PathLike],
    params: Mapping[str, Any] | None,
    out: str | os.PathLike,
    device: str | None = "auto",
    cache: CheckpointCache | None = None,
    progress: bool = False,
    out_format: str = "full",
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    rank: int | None = None,
    model_config: str | None = None,
) -> MergeReport:
    """Read checkpoints (files, model folders, ``hf://`` references, PEFT adapters), merge,
    and write ``out``: one safetensors file, a model folder (see :mod:`mergeflow.outputs`),
    or with ``out_format="lora"`` a PEFT adapter of rank ``rank``. ``model_config`` names
    the open_clip config an open_clip model folder's ``open_clip_config.json`` describes."""
    started = time.perf_counter()
    if out_format not in OUT_FORMATS:
        raise ParameterError(f"--out-format {out_format!r}: use full or lora")
    if out_format == "lora" and rank is None:
        raise ParameterError("--out-format lora needs --rank R (the adapter's rank)")
    merge_method = get_method(method)
    parsed = merge_method.parse_params(params)
    cache = cache or CheckpointCache()
    notes: list[str] = []
    with open_checkpoints(finetuned, base, cache) as (base_reader, readers):
        adapters = lora_adapters(readers)
        if out_format == "lora" and len(adapters) != len(readers):
            raise ParameterError(
                "--out-format lora writes the merged delta of LoRA adapters: every "
                "--finetuned input must be a PEFT adapter"
            )
        merge = start_merge(
            merge_method,
            readers,
            base_reader,
            parsed,
            device=device,
            progress=progress,
            out_dtype=torch.float32 if out_format == "lora" else None,
        )
        sources = [r.source for r in [base_reader, *readers] if r is not None and r.source]
        digests = dict(zip((s.uri for s in sources), source_digests(sources, cache), strict=True))
        recipe = Recipe(
            merge_method.name,
            parsed.model_dump(mode="json"),
            (base_reader.source.uri, digests[base_reader.source.uri])
            if base_reader is not None and base_reader.source is not None
            else None,
            [(r.source.uri, digests[r.source.uri]) for r in readers if r.source is not None],
        )
        if out_format == "lora":
            merged = dict(merge.tensors())  # the delta's factors need every tensor at once
            recipe = dataclasses.replace(recipe, library="peft")
            kept = save_lora_adapter(merged, base_reader, adapters, rank, str(out), recipe.card())
            worst, share = next(iter(kept.items()))
            notes.append(f"rank {rank} keeps {share:.1%} of the delta's energy at worst ({worst})")
            files: tuple[str, ...] = (
                "adapter_model.safetensors",
                "adapter_config.json",
                "README.md",
            )
        else:
            like = base_reader or readers[0]
            files = write_model(merge, out, recipe, like, cache, shard_size, model_config, notes)
    return MergeReport(
        method=merge_method.name,
        params=parsed.model_dump(mode="json"),
        out=str(out),
        num_tensors=len(merge.layout),
        num_bytes=sum(layout_bytes(entry) for entry in merge.layout.values()),
        seconds=time.perf_counter() - started,
        counts=merge.counts,
        files=files,
        notes=tuple(notes),
    )


def write_model(
    merge,
    out: str | os.PathLike,
    recipe: Recipe,
    like: CheckpointReader,
    cache: CheckpointCache,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    model_config: str | None = None,
    notes: list[str] | None = None,
) -> tuple[str, ...]:
    """Stream ``merge`` (anything with a ``layout`` and ``tensors(order)``: a
    :class:`StreamedMerge`, a continual merge's model) into ``out``: one safetensors file or
    a model folder with ``like``'s companions; returns the folder's file names."""
    notes = notes if notes is not None else []
    if is_folder_output(out):
        writer = model_folder_writer(
            merge.layout, str(out), recipe, like, cache, shard_size, model_config, notes
        )
    else:
        writer = StreamedOutput(
            {str(out): aligned_order(list(merge.layout), merge.layout)},
            merge.layout,
            recipe.metadata(),
        )
    with writer:
        for key, tensor in merge.tensors(writer.order()):
            writer.write(key, tensor)
    return tuple(writer.names) if isinstance(writer, ModelFolder) else ()


def model_folder_writer(
    layout: Layout,
    out: str,
    recipe: Recipe,
    like: CheckpointReader,
    cache: CheckpointCache,
    shard_size: int | str,
    model_config: str | None,
    notes: list[str],
) -> ModelFolder:
    """The writer of a model folder for a merge's output ``layout``, with the companions of
    ``like``'s folder (the base's); what a user must know about it goes to ``notes``."""
    from mergeflow.hf_clip import is_open_clip_clip

    companions = companion_files(like.source, cache)
    open_clip_config = None
    if is_open_clip_clip(layout):
        recipe = dataclasses.replace(recipe, library="open_clip")
        if model_config is not None:
            from mergeflow.models import open_clip_folder_config

            open_clip_config = open_clip_folder_config(model_config)
        elif "open_clip_config.json" not in companions:
            notes.append(
                "no open_clip_config.json written: the base folder has none; pass --model "
                "CONFIG to describe the architecture"
            )
    elif "config.json" not in companions:
        notes.append(f"no config.json copied: {like.name} is not in a model folder")
    return ModelFolder(out, layout, recipe, companions, shard_size, open_clip_config)
