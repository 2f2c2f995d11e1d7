"""PLeaS' least-squares step: each linear layer refit to the models' mean output.

Nasery et al., "PLeaS: Merging Models with Permutations and Least Squares", CVPR 2025.

Once the checkpoints share one coordinate system (the spec's ``align`` step: weight
matching, PLeaS' first step), each linear layer of the merged image tower is fit on
activations of a few unlabeled images of every task, each model run on its own weights:

    X̄ = mean_t X_t            X_t: the layer's input in model t, (N·L, in)
    Ȳ = mean_t X_t W_tᵀ + b_t  the models' outputs there, (N·L, out)
    [W b]* = argmin ‖X̄ Wᵀ + b − Ȳ‖² + ρ ‖[W b] − [W̄ b̄]‖²

ρ = ``ridge`` · trace(X̃ᵀX̃) / (in + 1) keeps the solve well posed, pulling towards the
average where the samples do not reach. This is PLeaS' full merge (budget ratio 0: every
matched unit pair merged); its partial merge, which keeps unmatched units of each model and
makes the model wider, is not offered. The paper runs Adam on the same per-layer loss (400
steps); the closed form is its minimum. The layers are RegMean's: every attention input
projection, every MLP Linear and ``visual.proj``; the attention output projection runs
inside ``nn.MultiheadAttention`` without a module call, so it and every other tensor take
the plain average.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergeflow.data_aware.base import DataAwareInputs, DataAwareMethod, MergeOutcome
from mergeflow.data_aware.regmean import capture_inputs
from mergeflow.methods.base import MethodParams
from mergeflow.statedict import StateDict, mean_of


class PleasParams(MethodParams):
    samples: int = Field(16, gt=0, description="unlabeled images per task (every model sees all)")
    ridge: float = Field(1e-4, ge=0.0, description="ρ relative to the inputs' mean energy")


def least_squares_layer(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, b)`` minimizing ‖x Wᵀ + b − y‖² + ρ‖[W b] − [weight bias]‖² for x (N, in),
    y (N, out), ``weight`` (out, in) and ``bias`` (out,) or None (no bias fitted)."""
    x, y = x.double(), y.double()
    if bias is not None:
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
        prior = torch.cat([weight.double(), bias.double()[:, None]], 1)
    else:
        prior = weight.double()
    gram = x.T @ x
    rho = ridge * torch.trace(gram) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + rho * eye, x.T @ y + rho * prior.T).T
    if bias is None:
        return solution.float(), None
    return solution[:, :-1].float(), solution[:, -1].float()


def _bias_key(key: str) -> str:
    """``…in_proj_weight`` → ``…in_proj_bias``, ``….weight`` → ``….bias``."""
    return key.removesuffix("weight") + "bias"


def run(inputs: DataAwareInputs, params: PleasParams) -> MergeOutcome:
    device = inputs.device
    model = inputs.model.to(device).eval()
    images = torch.cat([s.images[: params.samples] for s in inputs.samples]).to(device)
    sums_x: dict[str, torch.Tensor] = {}
    sums_y: dict[str, torch.Tensor] = {}
    for state in inputs.finetuned:
        # only the image tower runs
        model.visual.load_state_dict(
            {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        )
        on_device = {k: v.to(device, torch.float32) for k, v in state.items()}

        def receive(key: str, x: torch.Tensor, on_device=on_device) -> None:
            x = x.float().reshape(-1, x.shape[-1])
            weight = on_device[key]
            bias = on_device.get(_bias_key(key)) if key != "visual.proj" else None
            y = x @ weight if key == "visual.proj" else x @ weight.T
            if bias is not None:
                y = y + bias
            sums_x[key] = sums_x[key] + x if key in sums_x else x
            sums_y[key] = sums_y[key] + y if key in sums_y else y

        capture_inputs(model, images, device, receive)
    count = len(inputs.finetuned)
    merged: StateDict = {}
    fitted: dict[str, torch.Tensor] = {}
    for key in sums_x:
        mean_weight = mean_of([s[key].to(device, torch.float32) for s in inputs.finetuned])
        bias_key = None if key == "visual.proj" else _bias_key(key)
        has_bias = bias_key is not None and bias_key in inputs.finetuned[0]
        mean_bias = (
            mean_of([s[bias_key].to(device, torch.float32) for s in inputs.finetuned])
            if has_bias
            else None
        )
        prior = mean_weight.T if key == "visual.proj" else mean_weight  # as (out, in)
        weight, bias = least_squares_layer(
            sums_x[key] / count, sums_y[key] / count, prior, mean_bias, params.ridge
        )
        fitted[key] = weight.T if key == "visual.proj" else weight
        if has_bias:
            fitted[bias_key] = bias
    for key, reference in inputs.finetuned[0].items():
        if not reference.is_floating_point():
            merged[key] = reference.clone()
        elif key in fitted:
            merged[key] = fitted[key].to(reference.dtype).cpu()
        else:
            thetas = [s[key].to(device, torch.float32) for s in inputs.finetuned]
            merged[key] = mean_of(thetas).to(reference.dtype).cpu()
    info = {
        "fitted_by_least_squares": sorted(fitted),
        "images": len(images),
        "ridge": params.ridge,
    }
    return MergeOutcome(merged, info)


METHOD = DataAwareMethod(
    name="pleas",
    summary="each linear layer refit by least squares to the models' mean output on their "
    "mean input (after the spec's align step)",
    reference="Nasery et al., PLeaS: Merging Models with Permutations and Least Squares, CVPR 2025",
    params=PleasParams,
    run=run,
)
