"""What a data-aware merge method is, and what it is given.

Data-free methods (``mergeflow.methods``) see tensors only. The methods here also see the
model and samples of each task: unlabeled images (and the task's frozen zero-shot head) for
AdaMerging and Fisher merging, images for RegMean's input Gram matrices. They hold the T
fine-tuned state dicts in memory, which their papers' algorithms need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergeflow.methods.base import Described
from mergeflow.statedict import StateDict


@dataclass(frozen=True)
class TaskSamples:
    """Samples of one task: preprocessed ``images`` (N, 3, H, W) float32 and the task's
    frozen zero-shot ``head`` (C, D). Labels are never given to a method."""

    name: str
    images: torch.Tensor
    head: torch.Tensor


@dataclass
class DataAwareInputs:
    """Everything a data-aware merge reads: an open_clip ``model`` to run (its weights are
    replaced), the base and the fine-tuned state dicts, and samples of every task (in the
    order of ``finetuned``)."""

    model: torch.nn.Module
    base: StateDict
    finetuned: Sequence[StateDict]
    samples: Sequence[TaskSamples]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass(frozen=True)
class MergeOutcome:
    """The merged state dict and what the method learned or measured on the way (for the
    record: coefficients, entropies, sample counts), JSON-friendly."""

    state: StateDict
    info: Mapping[str, Any]


@dataclass(frozen=True)
class DataAwareMethod(Described):
    """A merge method that reads samples: ``run(inputs, params)`` returns the outcome."""

    run: Callable[[DataAwareInputs, Any], MergeOutcome]
    per_task: bool = False


def visual_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Floating tensors of the image tower (what image classification runs through)."""
    return [k for k, v in state.items() if k.startswith("visual.") and v.is_floating_point()]


def image_logits(
    model: torch.nn.Module, visual_params: Mapping[str, torch.Tensor], images, head
) -> torch.Tensor:
    """Logits (N, C) of ``images`` through ``model.visual`` run with ``visual_params`` (names
    without the ``visual.`` prefix), differentiable in those parameters."""
    from torch.func import functional_call

    features = functional_call(model.visual, dict(visual_params), (images,)).float()
    features = features / features.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp().detach().float() * features @ head.T


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def assemble(
    reference: Mapping[str, torch.Tensor],
    tower: Mapping[str, torch.Tensor],
    origin: Mapping[str, torch.Tensor],
    vectors: Sequence[Mapping[str, torch.Tensor]],
    scale: float,
) -> StateDict:
    """The whole merged state, in ``reference``'s keys and dtypes: the adapted ``tower``
    (``visual.`` names) where it has the key, else origin + scale · Σ_t v_t (the tensors
    the adaptation does not reach); non-floating tensors from ``reference``."""
    merged: StateDict = {}
    for key, value in reference.items():
        if not value.is_floating_point():
            merged[key] = value.clone()
        elif key in tower:
            merged[key] = tower[key].to(value.dtype)
        else:
            delta = sum((v[key] for v in vectors if key in v), torch.zeros_like(origin[key]))
            merged[key] = (origin[key] + scale * delta).to(value.dtype)
    return merged
