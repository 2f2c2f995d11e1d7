"""Merging as checkpoints arrive: a running state folded in one model at a time.

The state is R, a running task vector (one float32 safetensors file per fold), and a small
record (:class:`FoldRecord`: what was folded, the tasks' norms, the scale c). The merged
model is θ = θ_0 + c · R. Each method is a rule for one arrival τ_t = θ_t − θ_0:

=================  ==========================================  ==================
method             R after arrival t (R = τ_1 … after the 1st)  c
=================  ==========================================  ==================
``opcm``           R + τ̃_t, τ_t projected off R's top           n̄ / ‖R‖
                   directions (:mod:`mergeflow.methods.opcm`)
``average``        R + τ_t                                      1 / t
``task_arithmetic`` R + τ_t                                     λ
``ties``           R + λ · TIES(R, τ_t), from R = λ τ_1         1
=================  ==========================================  ==================

``ties`` is fusion_bench's continual TIES: the running vector and the new one are trimmed
to their top ``density`` entries (counted over the whole model), signs elected, the agreeing
entries summed. ``average`` and ``task_arithmetic`` end where their one-shot methods do;
``opcm`` ends where ``mergeflow merge --method opcm`` does with the checkpoints in arrival
order. One fold reads the base, R and the new checkpoint key by key (no more than one
key's tensors held, whatever the model's size) and writes the new R whole or not at all,
so a fold that fails leaves the state as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from mergeflow.checkpoints import CheckpointReader, load_for_compute
from mergeflow.errors import CheckpointError, ParameterError
from mergeflow.methods import opcm
from mergeflow.methods.base import Described, MethodParams
from mergeflow.methods.task_vectors import elect_and_merge, magnitude_trim, trim_thresholds
from mergeflow.outputs import StreamedOutput
from mergeflow.statedict import COMPUTE_DTYPE, Layout, check_same_layout

RUNNING_DTYPE = torch.float32


class Arrival(BaseModel):
    """One checkpoint folded in: where it was, its content digest, and its task."""

    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str
    task: str | None = None


class FoldRecord(BaseModel):
    """Where a continual merge stands: θ = θ_0 + ``scale`` · R, R stored at ``running``."""

    model_config = ConfigDict(frozen=True)

    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    base: Arrival
    arrivals: tuple[Arrival, ...] = ()
    task_norms: tuple[float, ...] = ()
    running: str | None = None
    running_norm: float = 0.0
    scale: float = 1.0

    def folded(self, sha256: str) -> bool:
        return any(a.sha256 == sha256 for a in self.arrivals)


class RunningAverageParams(MethodParams):
    pass


class RunningTaskArithmeticParams(MethodParams):
    scale: float = Field(0.3, description="λ, the weight of the summed task vectors")


class RunningTiesParams(MethodParams):
    scale: float = Field(0.5, description="λ, the weight of each step's TIES merge")
    density: float = Field(
        0.2, gt=0.0, le=1.0, description="fraction of each vector's entries kept (model-wide)"
    )


FoldFn = Callable[[str, "torch.Tensor | None", torch.Tensor, Any, Any], torch.Tensor]
"""(key, R or None at the first arrival, τ_t, params, context) → the new R for key."""


@dataclass(frozen=True)
class ContinualMethod(Described):
    """A continual merge as data: ``fold`` one key of one arrival, ``scale`` c from the
    record after it; ``prepare(sweep, params, record)`` (optional) streams over (key,
    [R, τ_t]) first for the statistics ``fold`` needs as its context."""

    fold: FoldFn
    scale: Callable[[FoldRecord, Any], float]
    prepare: Callable[[Callable[[], Iterator], Any, FoldRecord], Any] | None = None


def _sum_fold(key, running, tau, params, context):
    return tau.clone() if running is None else running + tau


def _opcm_fold(key, running, tau, params: opcm.OpcmParams, previous_scale: float):
    if running is None:
        return tau.clone()
    if opcm.keeps_first(key, params):
        return running * previous_scale  # fusion_bench rescales it in place, never merges it
    return opcm.fold(key, running, tau, params)


def _ties_prepare(sweep, params: RunningTiesParams, record: FoldRecord):
    if record.running is None:
        return None

    def vectors():  # trim_thresholds measures finetuned − base: here R and τ_t from 0
        for key, (running, tau) in sweep():
            yield key, [running, tau], torch.zeros_like(tau)

    return trim_thresholds(vectors, params.density, "base")


def _ties_fold(key, running, tau, params: RunningTiesParams, thresholds):
    if running is None:
        return params.scale * tau
    trimmed = magnitude_trim([running.clone(), tau.clone()], thresholds)
    return running + params.scale * elect_and_merge(trimmed, "sum")


CONTINUAL: dict[str, ContinualMethod] = {
    m.name: m
    for m in (
        ContinualMethod(
            name="opcm",
            summary="each arrival projected off the running merge's top directions, the "
            "whole rescaled to the tasks' mean norm",
            reference=opcm.METHOD.reference,
            params=opcm.OpcmParams,
            fold=_opcm_fold,
            scale=lambda record, params: opcm.rescale(record.task_norms, record.running_norm),
            prepare=lambda sweep, params, record: record.scale,
        ),
        ContinualMethod(
            name="average",
            summary="the running mean of the arrived models",
            reference="weight averaging, one model at a time",
            params=RunningAverageParams,
            fold=_sum_fold,
            scale=lambda record, params: 1.0 / max(1, len(record.arrivals)),
        ),
        ContinualMethod(
            name="task_arithmetic",
            summary="θ_0 + λ · the running sum of task vectors",
            reference="Ilharco et al., Editing Models with Task Arithmetic, one at a time",
            params=RunningTaskArithmeticParams,
            fold=_sum_fold,
            scale=lambda record, params: params.scale,
        ),
        ContinualMethod(
            name="ties",
            summary="each arrival TIES-merged with the running task vector (fusion_bench's "
            "continual TIES)",
            reference="Yadav et al., TIES-Merging, NeurIPS 2023, one model at a time",
            params=RunningTiesParams,
            fold=_ties_fold,
            scale=lambda record, params: 1.0,
            prepare=_ties_prepare,
        ),
    )
}


def get_continual(name: str) -> ContinualMethod:
    if name not in CONTINUAL:
        known = ", ".join(sorted(CONTINUAL))
        raise ParameterError(f"unknown continual method {name!r} (known: {known})")
    return CONTINUAL[name]


def start_record(method: str, params: dict | None, base: Arrival) -> FoldRecord:
    """The record of a continual merge before anything has arrived (params validated)."""
    parsed = get_continual(method).parse_params(params)
    return FoldRecord(method=method, params=parsed.model_dump(mode="json"), base=base)


def floating_layout(reader: CheckpointReader) -> Layout:
    return {k: v for k, v in reader.layout().items() if v[1].is_floating_point}


def fold_in(
    record: FoldRecord,
    base: CheckpointReader,
    new: CheckpointReader,
    arrival: Arrival,
    running_out: str,
    running: CheckpointReader | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> FoldRecord:
    """Fold ``new`` into the merge ``record`` describes: read the base, the running R
    (``running``, the reader of ``record.running``) and ``new`` key by key, write the new R
    to ``running_out`` (whole or not at all) and return the record after the arrival."""
    method = get_continual(record.method)
    params = method.parse_params(record.params)
    device = torch.device(device)
    if record.folded(arrival.sha256):
        raise ParameterError(f"{arrival.uri}: already folded in (sha256 {arrival.sha256[:12]})")
    if (running is None) != (record.running is None):
        raise ParameterError("fold_in needs the reader of the record's running vector")
    layout = floating_layout(new)
    base_layout = base.layout()
    check_same_layout(
        layout, {k: base_layout[k] for k in layout if k in base_layout}, new.name, base.name
    )
    if running is not None:
        expected = {k: (shape, RUNNING_DTYPE) for k, (shape, _) in layout.items()}
        check_same_layout(expected, running.layout(), new.name, running.name)

    def load(key):
        theta = load_for_compute(new, key, device, COMPUTE_DTYPE)
        tau = theta - load_for_compute(base, key, device, COMPUTE_DTYPE)
        if running is None:
            return None, tau
        return load_for_compute(running, key, device, COMPUTE_DTYPE), tau

    def sweep():
        for key in tqdm(layout, desc=f"{record.method} statistics", disable=not progress):
            yield key, load(key)

    context = method.prepare(sweep, params, record) if method.prepare else None
    out_layout = {k: (shape, RUNNING_DTYPE) for k, (shape, _) in layout.items()}
    tau_square = running_square = 0.0
    with StreamedOutput({running_out: list(layout)}, out_layout) as out:
        bar = tqdm(layout, desc=f"fold {arrival.uri}", unit="tensor", disable=not progress)
        for key in bar:
            previous, tau = load(key)
            folded = method.fold(key, previous, tau, params, context)
            tau_square += float(tau.double().square().sum())
            running_square += float(folded.double().square().sum())
            out.write(key, folded.to("cpu", RUNNING_DTYPE))
    after = record.model_copy(
        update={
            "arrivals": (*record.arrivals, arrival),
            "task_norms": (*record.task_norms, math.sqrt(tau_square)),
            "running": running_out,
            "running_norm": math.sqrt(running_square),
        }
    )
    return after.model_copy(update={"scale": method.scale(after, params)})


class ContinualModel:
    """The merged model a record stands for, ready to stream like a merge
    (:class:`~mergeflow.merge.StreamedMerge`): ``layout`` first, then :meth:`tensors`
    θ = θ_0 + c · R key by key in the base's dtypes; keys R lacks come from the base."""

    def __init__(self, record: FoldRecord, base: CheckpointReader, running: CheckpointReader):
        if record.running is None:
            raise ParameterError("nothing has been folded in yet: no merged model")
        self.record, self._base, self._running = record, base, running
        self.layout: Layout = dict(base.layout())
        self.method = get_continual(record.method)

    def tensors(self, order: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        keys = list(self.layout) if order is None else list(order)
        if sorted(keys) != sorted(self.layout):
            raise ValueError("the order must name every key of the model's layout once")
        held = set(self._running.keys())
        for key in keys:
            base = self._base.get(key)
            if key not in held:
                yield key, base.clone()
                continue
            merged = base.to(COMPUTE_DTYPE) + self.record.scale * self._running.get(key)
            if not bool(torch.isfinite(merged).all()):
                raise CheckpointError(f"{self._running.name}: key {key!r} merges to NaN or Inf")
            yield key, merged.to(base.dtype)
