"""PCB-merging: parameter competition balancing.

Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024.

Per task t and entry, over the whole model (d entries):

    a_t      = |τ_t| clipped to its [clip, 1 − clip] model-wide quantiles
    intra_t  = exp(T · norm(a_t)²)                  how much the entry matters to task t
    inter_t  = tanh(τ_t · Σ_s τ_s)                  how well it agrees with the other tasks
    β_t      = norm(max(intra_t · inter_t, q_t))    q_t: the (1 − ratio) quantile of β_t's
                                                    argument: entries below it drop to 0
    τ        = Σ_t β_t · sign(τ_t) a_t / Σ_t β_t,   θ = origin + λ · τ

where norm(x) = (x − min x) / (max x − min x) over the model. The quantiles come from
streaming passes (:mod:`mergeflow.order_stats`), so the model is never flattened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from mergeflow.methods.base import MergeMethod, Sweep
from mergeflow.methods.task_vectors import TaskVectorParams, origin_and_vectors, uses_base
from mergeflow.order_stats import per_task_order_statistics

_TINY = 1e-12


class PcbParams(TaskVectorParams):
    ratio: float = Field(
        0.1, gt=0.0, le=1.0, description="fraction of entries each task keeps after balancing"
    )
    clip: float = Field(
        0.0001, ge=0.0, lt=0.5, description="outlier fraction clipped at each end of |τ_t|"
    )
    scale: float = Field(1.0, description="λ, the weight of the balanced task vector")


@dataclass(frozen=True)
class PcbBounds:
    """Per-task model-wide statistics: the clip bounds of |τ_t|, then the (1 − ratio)
    quantile and the maximum of the competition score."""

    low: Sequence[float]
    high: Sequence[float]
    floor: Sequence[float] = ()
    top: Sequence[float] = ()


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    shape = (len(values),) + (1,) * (like.ndim - 1)
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(shape)


def _clipped(stacked: torch.Tensor, bounds: PcbBounds) -> torch.Tensor:
    low, high = _column(bounds.low, stacked), _column(bounds.high, stacked)
    return torch.minimum(torch.maximum(stacked.abs(), low), high)


def _competition(stacked: torch.Tensor, bounds: PcbBounds) -> torch.Tensor:
    low, high = _column(bounds.low, stacked), _column(bounds.high, stacked)
    intra = ((_clipped(stacked, bounds) - low) / (high - low).clamp(min=_TINY)) ** 2
    intra = torch.exp(stacked.shape[0] * intra)
    inter = torch.tanh(stacked * stacked.sum(0, keepdim=True))
    return intra * inter


def prepare(sweep: Sweep, params: PcbParams) -> PcbBounds:
    def stacked_vectors():
        for _, finetuned, base in sweep():
            yield torch.stack(origin_and_vectors(finetuned, base, params.center)[1])

    def magnitudes():
        for stacked in stacked_vectors():
            yield list(stacked.abs().reshape(stacked.shape[0], -1))

    def clip_ranks(d: int) -> list[int]:
        return [int(d * params.clip), max(0, int(d * (1 - params.clip)) - 1)]

    clip = per_task_order_statistics(magnitudes, clip_ranks)
    bounds = PcbBounds(low=[c[0] for c in clip], high=[c[1] for c in clip])

    def competitions():
        for stacked in stacked_vectors():
            yield list(_competition(stacked, bounds).reshape(stacked.shape[0], -1))

    def drop_ranks(d: int) -> list[int]:
        return [min(d - 1, int(d * (1 - params.ratio))), d - 1]

    drop = per_task_order_statistics(competitions, drop_ranks)
    return PcbBounds(bounds.low, bounds.high, [q[0] for q in drop], [q[1] for q in drop])


def merge_tensor(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: PcbParams,
    bounds: PcbBounds,
) -> torch.Tensor:
    origin, task_vectors = origin_and_vectors(finetuned, base, params.center)
    stacked = torch.stack(task_vectors)
    floor, top = _column(bounds.floor, stacked), _column(bounds.top, stacked)
    weight = (torch.maximum(_competition(stacked, bounds), floor) - floor) / (top - floor).clamp(
        min=_TINY
    )
    clipped = torch.sign(stacked) * _clipped(stacked, bounds)
    balanced = (clipped * weight).sum(0) / weight.sum(0).clamp(min=_TINY)
    return origin + params.scale * balanced


METHOD = MergeMethod(
    name="pcb",
    summary="weigh task-vector entries by intra- and inter-task competition, drop, rescale",
    reference="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024",
    params=PcbParams,
    merge_tensor=merge_tensor,
    uses_base=uses_base,
    prepare=prepare,
)
