"""RegMean: merge each linear layer in closed form from its inputs' Gram matrices.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023.

For a linear map y = x W (W: in × out) with task t's inputs X_t (Gram G_t = X_tᵀ X_t),

    W* = argmin_W Σ_t ‖X_t W − X_t W_t‖² = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_t,
    G̃_t = α G_t + (1 − α) diag(G_t)        (off-diagonals shrunk, as the paper does)

Here: every attention input projection (``attn.in_proj_weight``, inputs captured at the
attention block), every MLP ``c_fc`` / ``c_proj``, and the final ``visual.proj`` (its input
is the pooled feature). The
attention output projection runs inside ``nn.MultiheadAttention`` without a module call, so
its inputs are not observable by hooks; it and every other tensor take the plain average.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pydantic import Field

from mergeflow.data_aware.base import DataAwareInputs, DataAwareMethod, MergeOutcome
from mergeflow.methods.base import MethodParams
from mergeflow.statedict import StateDict, mean_of


class RegMeanParams(MethodParams):
    samples: int = Field(64, gt=0, description="images per task the Gram matrices come from")
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="α, the weight of off-diagonals")


def regmean_merge_matrix(
    weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float
) -> torch.Tensor:
    """W* for weights in x W orientation (in × out) and Grams (in × in), float32."""
    total_gram = torch.zeros_like(grams[0])
    total_product = torch.zeros_like(weights[0])
    for weight, gram in zip(weights, grams, strict=True):
        shrunk = alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))
        total_gram.add_(shrunk)
        total_product.add_(shrunk @ weight)
    return torch.linalg.solve(total_gram, total_product)


def _accumulate(grams: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> None:
    x = x.detach().float().reshape(-1, x.shape[-1])
    grams[key] = grams[key] + x.T @ x if key in grams else x.T @ x


def capture_inputs(
    model: torch.nn.Module,
    images: torch.Tensor,
    device,
    receive: Callable[[str, torch.Tensor], None],
) -> None:
    """One pass of ``images`` through ``model.visual`` calling ``receive(key, x)`` with the
    input (…, in) of every weight RegMean and PLeaS solve for, keyed by the weight's name:
    each attention input projection, each MLP Linear, and ``visual.proj``."""
    hooks = []
    for name, module in model.visual.named_modules():
        prefix = f"visual.{name}"
        if isinstance(module, torch.nn.MultiheadAttention):
            key = f"{prefix}.in_proj_weight"
        elif isinstance(module, torch.nn.Linear) and ".mlp." in f"{prefix}.":
            key = f"{prefix}.weight"
        else:
            continue
        hooks.append(
            module.register_forward_pre_hook(
                lambda module, args, key=key: receive(key, args[0].detach())
            )
        )
    # visual.proj is applied as ``pooled @ proj``, not by a module: with proj set aside the
    # tower returns exactly its input
    proj = getattr(model.visual, "proj", None)
    try:
        model.visual.proj = None
        with torch.no_grad():
            pooled = model.visual(images.to(device))
    finally:
        model.visual.proj = proj
        for hook in hooks:
            hook.remove()
    if proj is not None:
        receive("visual.proj", pooled)


def input_grams(model: torch.nn.Module, images: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """Gram matrices (in × in) of the inputs of every RegMean-merged weight of the image
    tower, keyed by the weight's name, from one pass over ``images``."""
    grams: dict[str, torch.Tensor] = {}
    capture_inputs(model, images, device, lambda key, x: _accumulate(grams, key, x))
    return grams


def run(inputs: DataAwareInputs, params: RegMeanParams) -> MergeOutcome:
    model = inputs.model.to(inputs.device)
    grams_per_task = []
    for state, task in zip(inputs.finetuned, inputs.samples, strict=True):
        model.load_state_dict(state)
        grams_per_task.append(input_grams(model, task.images[: params.samples], inputs.device))
    merged: StateDict = {}
    for key, reference in inputs.finetuned[0].items():
        thetas = [s[key].to(inputs.device, torch.float32) for s in inputs.finetuned]
        if not reference.is_floating_point():
            merged[key] = reference.clone()
            continue
        if key in grams_per_task[0]:
            grams = [g[key] for g in grams_per_task]
            transposed = key != "visual.proj"  # Linear and in_proj weights are out × in
            weights = [t.T if transposed else t for t in thetas]
            result = regmean_merge_matrix(weights, grams, params.alpha)
            merged[key] = (result.T if transposed else result).to(reference.dtype).cpu()
        else:
            merged[key] = mean_of(thetas).to(reference.dtype).cpu()
    return MergeOutcome(
        merged, {"merged_by_regmean": sorted(grams_per_task[0]), "samples": params.samples}
    )


METHOD = DataAwareMethod(
    name="regmean",
    summary="closed-form merge of linear layers from their inputs' Gram matrices",
    reference="Jin et al., Dataless Knowledge Fusion by Merging Weights (RegMean), ICLR 2023",
    params=RegMeanParams,
    run=run,
)
