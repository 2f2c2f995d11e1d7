"""The task-vector mechanism that task arithmetic, TIES and DARE are settings of.

    τ_t  = θ_t − origin             origin = θ_0 (base) or θ_avg (``center: average``)
    τ_t ← drop(τ_t)                  DARE: zero each entry with probability p, rescale 1/(1−p)
    τ_t ← trim(τ_t)                  TIES: keep entries with |τ_t| ≥ the task's model-wide
                                     (1 − density) magnitude quantile
    γ    = sign(Σ_t τ_t)             TIES: elect a sign per entry by summed mass
    τ    = Σ_t τ_t  or  disjoint mean/sum of the τ_t that agree with γ
    θ    = origin + λ · τ

Centering (``center: average``) is CART's idea applied to any of them: the task vectors are
taken from the weight average, so what they share is already in the origin.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field

from mergeflow.methods.base import MethodParams, Sweep
from mergeflow.order_stats import kth_smallest, per_task_order_statistics
from mergeflow.statedict import mean_of, sum_of

Center = Literal["base", "average"]


class TaskVectorParams(MethodParams):
    center: Center = Field(
        "base",
        description="origin of the task vectors: the pre-trained base (θ_t − θ_0) or the "
        "weight average (θ_t − θ_avg, CART's centering)",
    )


def uses_base(params: TaskVectorParams) -> bool:
    return params.center == "base"


def origin_and_vectors(
    finetuned: Sequence[torch.Tensor], base: torch.Tensor | None, center: Center
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The origin (θ_0 or θ_avg) and the task vectors θ_t − origin, float32 like the inputs."""
    if center == "average":
        origin = mean_of(finetuned)
    else:
        if base is None:
            raise ValueError("task vectors from the base need the base tensor")
        origin = base
    return origin, [theta - origin for theta in finetuned]


def merge_matrices(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params,
    matrix_rule: Callable[[list[torch.Tensor]], torch.Tensor],
) -> torch.Tensor:
    """origin + scale · Δ with Δ = ``matrix_rule(task vectors)`` on the matrices ``params``
    selects and the mean task vector on every other tensor: the shape TSV-M, Iso-C and
    Iso-CTS share (``params`` has ``center``, ``scale`` and a ``selects`` rule)."""
    origin, task_vectors = origin_and_vectors(finetuned, base, params.center)
    if params.selects(key, origin.shape):
        delta = matrix_rule(task_vectors)
    else:
        delta = mean_of(task_vectors)
    return origin + params.scale * delta


def _generator_seed(seed: int, key: str, task: int) -> int:
    digest = hashlib.sha256(f"{seed}/{key}/{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_drop(
    key: str, task_vectors: Sequence[torch.Tensor], p: float, seed: int, rescale: bool = True
) -> list[torch.Tensor]:
    """DARE's drop: zero each entry with probability ``p`` and (if ``rescale``) divide the rest
    by 1 − p. The mask of (key, task) depends only on (seed, key, task), and is drawn on the
    CPU, so the result is the same in any key order and on any device."""
    if p == 0:
        return list(task_vectors)
    out = []
    for t, tau in enumerate(task_vectors):
        generator = torch.Generator().manual_seed(_generator_seed(seed, key, t))
        keep = torch.rand(tau.shape, generator=generator) >= p
        dropped = tau * keep.to(tau.device)
        out.append(dropped / (1 - p) if rescale else dropped)
    return out


def magnitude_trim(
    task_vectors: Sequence[torch.Tensor], thresholds: Sequence[float] | None
) -> list[torch.Tensor]:
    """Zero the entries of τ_t with |τ_t| < thresholds[t] (None: keep all). In place: the
    vectors are the caller's own temporaries, and a copy of each would make a TIES merge's
    memory grow by one tensor per task."""
    if thresholds is None:
        return list(task_vectors)
    for tau, threshold in zip(task_vectors, thresholds, strict=True):
        tau.masked_fill_(tau.abs() < threshold, 0.0)
    return list(task_vectors)


def elect_and_merge(
    task_vectors: Sequence[torch.Tensor], aggregate: Literal["mean", "sum"]
) -> torch.Tensor:
    """TIES' sign election and disjoint merge.

    γ = sign(Σ_t τ_t) per entry (an exact tie of summed mass elects +); then the mean (or
    sum) over the tasks whose entry is nonzero and has sign γ. Accumulates task by task, so
    it holds a few tensors, not a (T, …) stack."""
    elected = torch.where(sum_of(task_vectors) < 0, -1.0, 1.0)
    merged = torch.zeros_like(elected)
    count = torch.zeros_like(elected)
    agrees = torch.empty_like(elected)  # one buffer: fresh temporaries per task cost page faults
    for tau in task_vectors:
        torch.mul(tau, elected, out=agrees).gt_(0)  # 1.0 where τ_t is nonzero with sign γ
        merged.addcmul_(tau, agrees)
        count.add_(agrees)
    if aggregate == "sum":
        return merged
    return merged.div_(count.clamp_(min=1))


def trim_thresholds(
    sweep: Sweep,
    density: float,
    center: Center,
    transform: Callable[[str, list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> list[float] | None:
    """Per task, the magnitude that keeps the top ``density`` fraction of the task vector's
    entries over the whole model: the k-th smallest |τ_t| with k = d − int(d · density);
    the entry at the threshold is kept too, as in TIES' reference code. Two streaming passes;
    ``transform(key, task_vectors)`` (e.g. DARE's drop) is applied before measuring.
    A density of 1 keeps everything: None, without reading the model."""
    if density >= 1:
        return None

    def magnitudes():
        for key, finetuned, base in sweep():
            _, taus = origin_and_vectors(finetuned, base, center)
            if transform is not None:
                taus = transform(key, taus)
            yield [tau.abs() for tau in taus]

    def rank(count: int) -> list[int]:
        return [threshold_rank(count, density)]

    return [values[0] for values in per_task_order_statistics(magnitudes, rank)]


def threshold_rank(count: int, density: float) -> int:
    """Where the trim threshold sits among ``count`` magnitudes in ascending order
    (0-based): k − 1 with k = count − int(count · density), so that entry and every larger
    one are kept, as in TIES' reference code."""
    return max(0, count - int(count * density) - 1)


def tensor_thresholds(task_vectors: Sequence[torch.Tensor], density: float) -> list[float] | None:
    """:func:`trim_thresholds`' rule within one tensor: per task, the magnitude that keeps
    the top ``density`` of this tensor's entries. None at density 1 (keep all)."""
    if density >= 1:
        return None
    rank = threshold_rank(task_vectors[0].numel(), density)
    return [kth_smallest(tau.abs(), rank) for tau in task_vectors]
