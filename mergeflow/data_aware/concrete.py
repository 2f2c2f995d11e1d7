"""Concrete subspace learning: one shared mask over the task vectors, learned at test time.

Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task
Model Fusion" (arXiv 2312.06173).

    m̂   ~ RelaxedBernoulli(temperature, logits)        one logit per parameter entry, shared
    m    = m̂ / mean(m̂)                                  per tensor
    θ(m) = θ_0 + Σ_t λ_t^l · (τ_t ⊙ m)                  τ_t = θ_t − θ_0
    logits* = argmin Σ_tasks mean_x H(p(y | x; θ(m)))   on unlabeled samples of each task

``over: task_arithmetic`` keeps every λ at ``scale`` (the paper's Concrete TA). ``over:
adamerging`` (Concrete AdaMerging, task- or layer-wise) learns the mask by a first-order
meta step: each step resets λ to ``scale``, takes one Adam step (lr ``base_lr``) on λ with
the mask held fixed, then steps the mask logits on the loss at the updated λ; afterwards the
mask is frozen and ordinary AdaMerging runs from ``scale`` for ``adamerging_steps``.

The final mask is deterministic. ``final_mask: expected`` (the default) uses each entry's
Bernoulli probability σ(logit), normalized per tensor like a sample: a deviation from the
paper, which merges with one unseeded continuous sample. ``final_mask: sample`` draws that
one sample from the seeded generator, as the paper and fusion_bench do. Only the image
tower's tensors are masked (the classification objective reaches nothing else); the other
tensors end at θ_0 + scale · Σ_t τ_t. ``diversity`` adds AdaMerging's optional term (the
entropy of each batch's mean prediction, maximized; see ``mergeflow.data_aware.adamerging``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergeflow.data_aware.adamerging import (
    _Batches,
    _marginal_entropy,
    task_arithmetic_vectors,
)
from mergeflow.data_aware.base import (
    DataAwareInputs,
    DataAwareMethod,
    MergeOutcome,
    assemble,
    entropy,
    image_logits,
    visual_keys,
)
from mergeflow.methods.base import MethodParams


class ConcreteParams(MethodParams):
    over: Literal["task_arithmetic", "adamerging"] = Field(
        "task_arithmetic",
        description="what the mask is learned over: task arithmetic at a fixed scale, or "
        "AdaMerging (learned coefficients, first-order meta step)",
    )
    granularity: Literal["layer", "task"] = Field(
        "layer", description="adamerging: one coefficient per task and tensor, or per task"
    )
    scale: float = Field(0.3, description="λ of task arithmetic; AdaMerging's initial λ")
    temperature: float = Field(0.5, gt=0.0, description="of the relaxed Bernoulli mask")
    initial_logits: float = Field(0.0, description="mask logits at the start (0: p = 0.5)")
    steps: int = Field(100, ge=0, description="mask optimizer steps (the paper: 2000)")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the mask logits")
    base_lr: float = Field(1.0, gt=0.0, description="adamerging: Adam lr of the inner step")
    adamerging_steps: int = Field(
        100, ge=0, description="adamerging: steps with the mask frozen (the paper: 1000)"
    )
    adamerging_lr: float = Field(1e-3, gt=0.0, description="adamerging: Adam lr afterwards")
    samples: int = Field(64, gt=0, description="unlabeled images per task")
    batch_size: int = Field(16, gt=0, description="images per task per step")
    final_mask: Literal["expected", "sample"] = Field(
        "expected",
        description="the mask merged at the end: σ(logits) normalized per tensor, or one "
        "relaxed sample drawn from the seeded generator",
    )
    diversity: float = Field(
        0.0,
        ge=0.0,
        description="δ: weight of the entropy of each batch's mean prediction, maximized "
        "(as in adamerging); 0: the paper's entropy alone",
    )
    seed: int = Field(0, description="seed of the mask samples and the batch order")
    fusion_bench_parity: bool = Field(
        False,
        description="adamerging: take the inner step's gradient at the previous step's "
        "adapted λ (applied from the reset λ), as fusion_bench and the official code do: "
        "they merge the weights before resetting λ",
    )


def relaxed_bernoulli(
    logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """A reparameterized RelaxedBernoulli(temperature, logits) sample, same shape as
    ``logits``: σ((logit(p) + logit(u)) / temperature), u ~ U(0, 1) from ``generator``.
    Probabilities and uniforms are kept inside (ε, 1 − ε) as torch.distributions does, so
    one generator state gives torch's own sample."""
    eps = torch.finfo(logits.dtype).eps
    p = torch.sigmoid(logits).clamp(eps, 1 - eps)
    u = torch.rand(
        logits.shape, generator=generator, dtype=logits.dtype, device=logits.device
    ).clamp(eps, 1 - eps)
    noisy = (u.log() - (-u).log1p() + p.log() - (-p).log1p()) / temperature
    return torch.sigmoid(noisy).clamp(torch.finfo(logits.dtype).tiny, 1 - eps)


def normalized(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` divided by its mean: the masked task vector keeps its overall size."""
    return mask / mask.mean()


def run_concrete(inputs: DataAwareInputs, params: ConcreteParams) -> MergeOutcome:
    device = inputs.device
    model = inputs.model.to(device).eval()
    origin, vectors = task_arithmetic_vectors(inputs)
    keys = visual_keys(origin)
    num_tasks = len(vectors)
    adaptive = params.over == "adamerging"
    layers = len(keys) if adaptive and params.granularity == "layer" else 1
    start = torch.full((num_tasks, layers), params.scale, device=device)
    coefficients = start.clone().requires_grad_(adaptive)
    fixed = {k: origin[k].to(device) for k in keys}
    stacked = {k: torch.stack([v[k] for v in vectors]).to(device) for k in keys}
    logits = {k: torch.full_like(fixed[k], params.initial_logits, requires_grad=True) for k in keys}
    generator = torch.Generator(device).manual_seed(params.seed)
    samples = [s.images[: params.samples].to(device) for s in inputs.samples]
    heads = [s.head.to(device) for s in inputs.samples]
    batches = [_Batches(len(x), params.batch_size, params.seed + t) for t, x in enumerate(samples)]

    def sample_mask() -> dict[str, torch.Tensor]:
        # one draw per tensor in the model's order (the order torch's samplers use)
        return {
            k: normalized(relaxed_bernoulli(logits[k], params.temperature, generator)) for k in keys
        }

    def expected_mask() -> dict[str, torch.Tensor]:
        return {k: normalized(torch.sigmoid(logits[k].detach())) for k in keys}

    def tower(mask, weights) -> dict[str, torch.Tensor]:
        merged = {}
        for layer, key in enumerate(keys):
            w = weights[:, layer if layers > 1 else 0]
            w = w.reshape((num_tasks,) + (1,) * (stacked[key].ndim - 1))
            merged[key.removeprefix("visual.")] = fixed[key] + (w * stacked[key]).sum(0) * mask[key]
        return merged

    def loss(tower_params) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for t in range(num_tasks):
            batch = samples[t][batches[t].next().to(device)]
            logits_t = image_logits(model, tower_params, batch, heads[t])
            total = total + entropy(logits_t).mean()
            if params.diversity:
                total = total - params.diversity * _marginal_entropy(logits_t)
        return total

    def mean_entropy(mask, weights) -> float:
        with torch.no_grad():
            params_now = tower(mask, weights)
            return sum(
                entropy(image_logits(model, params_now, x, head)).mean().item()
                for x, head in zip(samples, heads, strict=True)
            ) / max(1, num_tasks)

    uniform = {k: torch.ones_like(fixed[k]) for k in keys}
    before = mean_entropy(uniform, start)
    mask_optimizer = torch.optim.Adam(list(logits.values()), lr=params.lr)
    inner = torch.optim.Adam([coefficients], lr=params.base_lr) if adaptive else None
    for _ in range(params.steps):
        mask = sample_mask()
        if inner is not None:
            if not params.fusion_bench_parity:
                with torch.no_grad():
                    coefficients.copy_(start)
            inner.zero_grad()
            loss(tower({k: m.detach() for k, m in mask.items()}, coefficients)).backward()
            with torch.no_grad():
                coefficients.copy_(start)
            inner.step()
        mask_optimizer.zero_grad()
        loss(tower(mask, coefficients.detach())).backward()
        mask_optimizer.step()

    with torch.no_grad():
        final = sample_mask() if params.final_mask == "sample" else expected_mask()
        final = {k: m.detach() for k, m in final.items()}
    if adaptive:
        with torch.no_grad():
            coefficients.copy_(start)
        optimizer = torch.optim.Adam([coefficients], lr=params.adamerging_lr)
        for _ in range(params.adamerging_steps):
            optimizer.zero_grad()
            loss(tower(final, coefficients)).backward()
            optimizer.step()
    learned = coefficients.detach()
    after = mean_entropy(final, learned)

    with torch.no_grad():
        merged_tower = {f"visual.{k}": v.cpu() for k, v in tower(final, learned).items()}
    merged_state = assemble(inputs.finetuned[0], merged_tower, origin, vectors, params.scale)
    kept = sum(int((logits[k] > 0).sum()) for k in keys)
    total = sum(logits[k].numel() for k in keys)
    info = {
        "over": params.over,
        "final_mask": params.final_mask,
        "mask_keep_share": kept / max(1, total),
        "entropy_before": before,
        "entropy_after": after,
        "masked_tensors": len(keys),
    }
    if adaptive:
        info["granularity"] = params.granularity
        info["coefficients"] = {
            s.name: [round(x, 5) for x in learned[t].cpu().tolist()]
            for t, s in enumerate(inputs.samples)
        }
    return MergeOutcome(merged_state, info)


CONCRETE = DataAwareMethod(
    name="concrete",
    summary="a shared Concrete (relaxed Bernoulli) mask on the task vectors learned by "
    "entropy minimization, over task arithmetic or AdaMerging",
    reference="Tang et al., Concrete Subspace Learning based Interference Elimination, 2023",
    params=ConcreteParams,
    run=run_concrete,
)
