"""Run a merge method over checkpoints, one tensor at a time.

Peak memory is the merged output plus, for the key being merged, one tensor per input.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
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
    save_state_dict,
)
from mergeflow.errors import ParameterError
from mergeflow.lora import save_lora_adapter
from mergeflow.memory import release_large_frees
from mergeflow.methods import MergeMethod, MethodParams, get_method
from mergeflow.methods.cart import LowRankSelection
from mergeflow.outputs import (
    DEFAULT_SHARD_SIZE,
    Recipe,
    companion_files,
    is_folder_output,
    save_model_folder,
)
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


def merge_readers(
    method: str | MergeMethod,
    finetuned: Sequence[CheckpointReader],
    base: CheckpointReader | None = None,
    params: Mapping[str, Any] | MethodParams | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = False,
) -> StateDict:
    """Merge ``finetuned`` with ``method`` key by key and return the merged state dict
    (see :func:`merge_with_counts`)."""
    return merge_with_counts(method, finetuned, base, params, device, progress)[0]


def merge_with_counts(
    method: str | MergeMethod,
    finetuned: Sequence[CheckpointReader],
    base: CheckpointReader | None = None,
    params: Mapping[str, Any] | MethodParams | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[StateDict, MergeCounts]:
    """Merge ``finetuned`` with ``method`` key by key: the merged state dict and how each
    tensor was treated.

    Floating tensors are merged in float32 on ``device`` and returned on the CPU in the
    inputs' dtype (or ``out_dtype``). Non-floating tensors (integer buffers) are carried from
    the base, or from the first fine-tuned checkpoint when there is no base; so is every
    tensor that no checkpoint changed (all inputs equal: every method's fixed point), and
    every key only the base holds. Methods that need model-wide statistics first stream over
    the checkpoints (``MergeMethod.prepare``); either way no more than one key's tensors per
    input are held besides the output. A low-rank method that selects no matrix is refused.
    """
    method = get_method(method) if isinstance(method, str) else method
    parsed = method.parse_params(params)
    if not finetuned:
        raise ParameterError("no fine-tuned checkpoints given")
    uses_base = method.needs_base(parsed)
    if uses_base and base is None:
        raise ParameterError(f"method {method.name!r} needs a base checkpoint")
    layout = common_layout(finetuned)
    base_only = check_base_layout(layout, base, finetuned[0].name) if base is not None else {}
    compute_device = resolve_device(device)
    carrier = base if base is not None else finetuned[0]
    floating = [key for key, (_, dtype) in layout.items() if dtype.is_floating_point]
    low_rank = isinstance(parsed, LowRankSelection)
    if low_rank and not any(parsed.selects(k, layout[k][0]) for k in floating):
        raise ParameterError(
            f"method {method.name!r} selects no weight matrix of {finetuned[0].name} "
            f"({parsed.describe_rule()}; architecture: {describe(layout)}): name the "
            "matrices with include=REGEX"
        )

    def load(key: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        tensors = [load_for_compute(r, key, compute_device, COMPUTE_DTYPE) for r in finetuned]
        base_tensor = (
            load_for_compute(base, key, compute_device, COMPUTE_DTYPE) if uses_base else None
        )
        return tensors, base_tensor

    passes = 0

    def sweep():
        nonlocal passes
        passes += 1
        for key in tqdm(
            floating, desc=f"{method.name} statistics, pass {passes}", disable=not progress
        ):
            yield (key, *load(key))

    context = method.prepare(sweep, parsed) if method.prepare is not None else None
    if passes:
        log.info("%s: %d statistics passes over the checkpoints", method.name, passes)

    merged: StateDict = {}
    counts = MergeCounts()
    keys = tqdm(layout.items(), desc=f"merge {method.name}", unit="tensor", disable=not progress)
    for key, (shape, dtype) in keys:
        if not dtype.is_floating_point:
            merged[key] = carrier.get(key).clone()
            counts.copied += 1
            continue
        tensors, base_tensor = load(key)
        target = out_dtype or dtype
        if all(torch.equal(tensors[0], t) for t in tensors[1:]) and (
            base_tensor is None or torch.equal(tensors[0], base_tensor)
        ):
            merged[key] = tensors[0].to(target).cpu()
            counts.copied += 1
            continue
        result = method.merge_tensor(key, tensors, base_tensor, parsed, context)
        merged[key] = result.to(target).cpu()
        if low_rank and parsed.selects(key, shape):
            counts.low_rank += 1
        else:
            counts.element_wise += 1
    for key in base_only:
        merged[key] = base.get(key).clone()
        counts.from_base += 1
    log.info("%s merge of %d checkpoints: %s", method.name, len(finetuned), counts.describe())
    return merged, counts


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
    release_large_frees()
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
        merged, counts = merge_with_counts(
            merge_method,
            readers,
            base_reader,
            parsed,
            device=device,
            progress=progress,
            out_dtype=torch.float32 if out_format == "lora" else None,
        )
        recipe = Recipe(
            merge_method.name,
            parsed.model_dump(mode="json"),
            (base_reader.source.uri, base_reader.source.digest(cache))
            if base_reader is not None and base_reader.source is not None
            else None,
            [(r.source.uri, r.source.digest(cache)) for r in readers if r.source is not None],
        )
        if out_format == "lora":
            recipe = dataclasses.replace(recipe, library="peft")
            kept = save_lora_adapter(merged, base_reader, adapters, rank, str(out), recipe.card())
            worst, share = next(iter(kept.items()))
            notes.append(f"rank {rank} keeps {share:.1%} of the delta's energy at worst ({worst})")
            files: tuple[str, ...] = (
                "adapter_model.safetensors",
                "adapter_config.json",
                "README.md",
            )
        elif is_folder_output(out):
            files = tuple(
                write_model_folder(
                    merged,
                    str(out),
                    recipe,
                    base_reader or readers[0],
                    cache,
                    shard_size,
                    model_config,
                    notes,
                )
            )
        else:
            save_state_dict(merged, out, recipe.metadata())
            files = ()
    return MergeReport(
        method=merge_method.name,
        params=parsed.model_dump(mode="json"),
        out=str(out),
        num_tensors=len(merged),
        num_bytes=sum(t.numel() * t.element_size() for t in merged.values()),
        seconds=time.perf_counter() - started,
        counts=counts,
        files=files,
        notes=tuple(notes),
    )


def write_model_folder(
    merged: StateDict,
    out: str,
    recipe: Recipe,
    like: CheckpointReader,
    cache: CheckpointCache,
    shard_size: int | str,
    model_config: str | None,
    notes: list[str],
) -> list[str]:
    """``merged`` as a model folder with the companions of ``like``'s folder (the base's)."""
    from mergeflow.hf_clip import is_open_clip_clip

    companions = companion_files(like.source, cache)
    open_clip_config = None
    if is_open_clip_clip(merged):
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
    return save_model_folder(merged, out, recipe, companions, shard_size, open_clip_config)
