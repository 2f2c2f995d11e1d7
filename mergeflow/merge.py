"""Run a merge method over checkpoints, one tensor at a time.

Peak memory is the merged output plus, for the key being merged, one tensor per input.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

import mergeflow
from mergeflow.checkpoints import (
    CheckpointReader,
    load_for_compute,
    open_checkpoint,
    save_state_dict,
)
from mergeflow.errors import ParameterError
from mergeflow.memory import release_large_frees
from mergeflow.methods import MergeMethod, MethodParams, get_method
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


def merge_readers(
    method: str | MergeMethod,
    finetuned: Sequence[CheckpointReader],
    base: CheckpointReader | None = None,
    params: Mapping[str, Any] | MethodParams | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = False,
) -> StateDict:
    """Merge ``finetuned`` with ``method`` key by key and return the merged state dict.

    Floating tensors are merged in float32 on ``device`` and returned on the CPU in the
    inputs' dtype. Non-floating tensors (integer buffers) are carried from the base, or from
    the first fine-tuned checkpoint when there is no base. Methods that need model-wide
    statistics first stream over the checkpoints (``MergeMethod.prepare``); either way no
    more than one key's tensors per input are held besides the output.
    """
    method = get_method(method) if isinstance(method, str) else method
    parsed = method.parse_params(params)
    if not finetuned:
        raise ParameterError("no fine-tuned checkpoints given")
    uses_base = method.needs_base(parsed)
    if uses_base and base is None:
        raise ParameterError(f"method {method.name!r} needs a base checkpoint")
    inputs = ([base] if base is not None else []) + list(finetuned)
    layout = common_layout(inputs)
    compute_device = resolve_device(device)
    carrier = base if base is not None else finetuned[0]

    def load(key: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        tensors = [load_for_compute(r, key, compute_device, COMPUTE_DTYPE) for r in finetuned]
        base_tensor = (
            load_for_compute(base, key, compute_device, COMPUTE_DTYPE) if uses_base else None
        )
        return tensors, base_tensor

    floating = [key for key, (_, dtype) in layout.items() if dtype.is_floating_point]
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
    keys = tqdm(layout.items(), desc=f"merge {method.name}", unit="tensor", disable=not progress)
    for key, (_, dtype) in keys:
        if not dtype.is_floating_point:
            merged[key] = carrier.get(key).clone()
            continue
        tensors, base_tensor = load(key)
        result = method.merge_tensor(key, tensors, base_tensor, parsed, context)
        merged[key] = result.to(dtype).cpu()
    return merged


@dataclass(frozen=True)
class MergeReport:
    method: str
    params: dict
    out: str
    num_tensors: int
    num_bytes: int
    seconds: float


def merge_files(
    method: str,
    base: str | os.PathLike | None,
    finetuned: Sequence[str | os.PathLike],
    params: Mapping[str, Any] | None,
    out: str | os.PathLike,
    device: str | None = "auto",
    cache: CheckpointCache | None = None,
    progress: bool = False,
) -> MergeReport:
    """Read checkpoints from local paths or URIs, merge, and write safetensors to ``out``."""
    started = time.perf_counter()
    release_large_frees()
    merge_method = get_method(method)
    parsed = merge_method.parse_params(params)
    cache = cache or CheckpointCache()
    readers = [open_checkpoint(uri, cache) for uri in finetuned]
    base_reader = open_checkpoint(base, cache) if base is not None else None
    try:
        merged = merge_readers(
            merge_method, readers, base_reader, parsed, device=device, progress=progress
        )
    finally:
        for reader in readers + ([base_reader] if base_reader else []):
            reader.close()
    metadata = {
        "mergeflow.version": mergeflow.__version__,
        "mergeflow.method": merge_method.name,
        "mergeflow.params": json.dumps(parsed.model_dump(mode="json"), sort_keys=True),
    }
    save_state_dict(merged, out, metadata)
    return MergeReport(
        method=merge_method.name,
        params=parsed.model_dump(mode="json"),
        out=str(out),
        num_tensors=len(merged),
        num_bytes=sum(t.numel() * t.element_size() for t in merged.values()),
        seconds=time.perf_counter() - started,
    )
