"""Fisher merging: a per-parameter weighted average, weighted by each model's diagonal Fisher.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.

    θ = Σ_t F_t ⊙ θ_t / Σ_t F_t,     F_t = E_x E_{y ~ p_t(y|x)} [(∇_θ log p_t(y|x))²]

estimated on ``samples`` unlabeled images of task t with one label drawn from the model's
own prediction per image (seeded), through the task's frozen zero-shot head. Entries no
model's Fisher reaches (the text tower, say) take the plain average.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergeflow.data_aware.base import (
    DataAwareInputs,
    DataAwareMethod,
    MergeOutcome,
    TaskSamples,
    image_logits,
    visual_keys,
)
from mergeflow.methods.base import MethodParams
from mergeflow.statedict import StateDict, mean_of


class FisherParams(MethodParams):
    samples: int = Field(64, gt=0, description="images per task the Fisher is estimated on")
    seed: int = Field(0, description="seed of the sampled labels")
    floor: float = Field(1e-8, ge=0.0, description="added to every Fisher entry")


def fisher_merge_tensor(
    thetas: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], floor: float = 0.0
) -> torch.Tensor:
    """Σ_t F_t θ_t / Σ_t F_t for one tensor (float32); where Σ_t F_t is 0, the mean."""
    weighted = torch.zeros_like(thetas[0])
    total = torch.zeros_like(thetas[0])
    for theta, fisher in zip(thetas, fishers, strict=True):
        weight = fisher + floor
        weighted.add_(weight * theta)
        total.add_(weight)
    return torch.where(total > 0, weighted / total.clamp(min=1e-30), mean_of(thetas))


def diagonal_fisher(
    model: torch.nn.Module,
    state: StateDict,
    task: TaskSamples,
    samples: int,
    seed: int,
    device: torch.device,
) -> StateDict:
    """Diagonal Fisher of the image tower's parameters (keys as in ``state``), float32."""
    keys = visual_keys(state)
    params = {
        k.removeprefix("visual."): state[k].detach().to(device, torch.float32).requires_grad_(True)
        for k in keys
    }
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    head = task.head.to(device)
    images = task.images[:samples].to(device)
    for image in images:
        logits = image_logits(model, params, image[None], head)[0]
        label = torch.multinomial(torch.softmax(logits.detach().cpu(), -1), 1, generator=generator)
        log_likelihood = torch.log_softmax(logits, -1)[label.item()]
        grads = torch.autograd.grad(log_likelihood, list(params.values()), allow_unused=True)
        for (name, _), grad in zip(params.items(), grads, strict=True):
            if grad is not None:
                fisher[name].add_(grad.detach() ** 2)
    return {f"visual.{k}": (f / len(images)).cpu() for k, f in fisher.items()}


def run(inputs: DataAwareInputs, params: FisherParams) -> MergeOutcome:
    model = inputs.model.to(inputs.device)
    fishers = [
        diagonal_fisher(model, state, task, params.samples, params.seed + t, inputs.device)
        for t, (state, task) in enumerate(zip(inputs.finetuned, inputs.samples, strict=True))
    ]
    merged: StateDict = {}
    for key, reference in inputs.finetuned[0].items():
        thetas = [s[key].to(torch.float32) for s in inputs.finetuned]
        if not reference.is_floating_point():
            merged[key] = reference.clone()
        elif key in fishers[0]:
            merged[key] = fisher_merge_tensor(thetas, [f[key] for f in fishers], params.floor)
            merged[key] = merged[key].to(reference.dtype)
        else:
            merged[key] = mean_of(thetas).to(reference.dtype)
    mass = {
        s.name: float(sum(v.sum() for v in f.values()))
        for s, f in zip(inputs.samples, fishers, strict=True)
    }
    return MergeOutcome(merged, {"fisher_mass": mass, "samples": params.samples})


METHOD = DataAwareMethod(
    name="fisher",
    summary="average weighted per parameter by each model's diagonal Fisher",
    reference="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022",
    params=FisherParams,
    run=run,
)
