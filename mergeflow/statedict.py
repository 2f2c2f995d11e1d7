"""State-dict algebra with layout checks.

A state dict maps parameter names to tensors. Every operation here first checks that its
operands agree on keys, shapes and dtypes and names the offending key when they do not.
Arithmetic runs in float32 and returns tensors in the operands' dtype, so fp16/bf16
checkpoints keep their dtype without losing precision in the middle of a computation.

Non-floating tensors (integer buffers such as position ids or batch counters) are not
arithmetic: every operation carries them over from its first operand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mergeflow.errors import StateDictMismatchError

StateDict = dict[str, torch.Tensor]
TensorLayout = tuple[tuple[int, ...], torch.dtype]
Layout = dict[str, TensorLayout]

COMPUTE_DTYPE = torch.float32


def layout_of(state: Mapping[str, torch.Tensor]) -> Layout:
    """Shape and dtype of every tensor in ``state``."""
    return {key: (tuple(t.shape), t.dtype) for key, t in state.items()}


def _format_keys(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = len(keys) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def check_same_layout(
    reference: Mapping[str, TensorLayout],
    other: Mapping[str, TensorLayout],
    reference_name: str = "reference",
    other_name: str = "other",
) -> None:
    """Raise :class:`StateDictMismatchError` unless both layouts hold the same keys, shapes
    and dtypes. The message names the first offending key and both sources."""
    missing = [k for k in reference if k not in other]
    if missing:
        raise StateDictMismatchError(
            f"key {_format_keys(missing)} of {reference_name} is missing from {other_name}"
        )
    extra = [k for k in other if k not in reference]
    if extra:
        raise StateDictMismatchError(
            f"key {_format_keys(extra)} of {other_name} is not in {reference_name}"
        )
    for key, (shape, dtype) in reference.items():
        other_shape, other_dtype = other[key]
        if tuple(other_shape) != tuple(shape):
            raise StateDictMismatchError(
                f"key {key!r}: shape {tuple(shape)} in {reference_name} "
                f"but {tuple(other_shape)} in {other_name}"
            )
        if other_dtype != dtype:
            raise StateDictMismatchError(
                f"key {key!r}: dtype {dtype} in {reference_name} but {other_dtype} in {other_name}"
            )


def _checked(operands: Sequence[Mapping[str, torch.Tensor]]) -> None:
    if not operands:
        raise StateDictMismatchError("no state dicts given")
    reference = layout_of(operands[0])
    for i, other in enumerate(operands[1:], start=1):
        check_same_layout(reference, layout_of(other), "state dict 0", f"state dict {i}")


def _combine(operands: Sequence[Mapping[str, torch.Tensor]], op) -> StateDict:
    _checked(operands)
    out: StateDict = {}
    for key, first in operands[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        values = [s[key].to(COMPUTE_DTYPE) for s in operands]
        out[key] = op(values).to(first.dtype)
    return out


def difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> StateDict:
    """``a - b`` per key (a task vector when ``a`` is fine-tuned and ``b`` its base)."""
    return _combine([a, b], lambda v: v[0] - v[1])


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> StateDict:
    """``a + b`` per key."""
    return _combine([a, b], lambda v: v[0] + v[1])


def total(states: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Sum of several state dicts per key."""
    return _combine(states, sum_of)


def mean(states: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Mean of several state dicts per key (plain weight averaging)."""
    return _combine(states, lambda v: torch.stack(v).mean(0))


def scale(state: Mapping[str, torch.Tensor], factor: float) -> StateDict:
    """``factor * state`` per key."""
    return _combine([state], lambda v: v[0] * factor)


def sum_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_t tensors[t], accumulated in place into one new tensor (a (T, …) stack would copy
    every input first)."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total


def mean_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """θ_avg, accumulated in place: one extra tensor, not a (T, …) stack. Equal inputs give
    that tensor exactly (a sum and a division would round it), so what no task changed
    stays bit for bit what it was, whichever method averages it."""
    if all(torch.equal(tensors[0], t) for t in tensors[1:]):
        return tensors[0].clone()
    return sum_of(tensors).div_(len(tensors))
