"""AdaMerging, and CART + AdaMerging: merging coefficients learned at test time.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024;
Choi et al., "Revisiting Weight Averaging for Model Merging" (2024), CART + test-time
adaptation.

    θ(λ) = origin + Σ_t λ_t^l · v_t^l         (l: each tensor, or one λ_t per task)
    λ*   = argmin_λ Σ_tasks mean_x H(p(y | x; θ(λ)))    on unlabeled samples of each task

``adamerging`` weights the task vectors v_t = θ_t − θ_0 from θ_0 (AdaMerging over task
arithmetic); ``cart_adamerging`` weights CART's rank-k centered vectors v_t = SVD_k(θ_t −
θ_avg) from θ_avg (zero outside CART's selected matrices). Only the image tower's tensors
take part; the rest are the origin plus the initial λ times the vectors.

With ``diversity`` δ > 0 each task's term becomes mean_x H(p(y|x)) − δ · H(mean_x p(y|x)),
the information-maximization objective of SHOT (Liang et al., ICML 2020): entropy alone can
be lowered by predicting one class for every image, and on small models it is (the offline
zoo's merged models already over-predict a few classes; README, data-aware merging).

With ``select: eata``, each step keeps, per task, the samples that are confident (entropy
below ``entropy_margin`` · ln C) and not redundant (cosine similarity of their prediction to
the task's running mean prediction below ``redundancy``), weighted by exp(E₀ − H), in the
spirit of EATA (Niu et al., ICML 2022).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from mergeflow.data_aware.base import (
    DataAwareInputs,
    DataAwareMethod,
    MergeOutcome,
    assemble,
    entropy,
    image_logits,
    visual_keys,
)
from mergeflow.kernels.cart import DEFAULT_RANK_RATIO, factorize_centered
from mergeflow.methods.base import MethodParams
from mergeflow.methods.cart import LowRankSelection
from mergeflow.statedict import StateDict, mean_of
from mergeflow.svd import low_rank_sum, rank_for


class AdaMergingParams(MethodParams):
    granularity: Literal["layer", "task"] = Field(
        "layer", description="one coefficient per task and tensor (layer), or per task"
    )
    init: float = Field(0.3, description="initial coefficient")
    steps: int = Field(100, ge=0, description="optimizer steps")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate")
    samples: int = Field(64, gt=0, description="unlabeled images per task")
    batch_size: int = Field(16, gt=0, description="images per task per step")
    select: Literal["none", "eata"] = Field("none", description="sample selection")
    entropy_margin: float = Field(0.4, gt=0.0, description="EATA: keep H < margin · ln C")
    redundancy: float = Field(0.95, gt=0.0, le=1.0, description="EATA: cosine limit")
    diversity: float = Field(
        0.0,
        ge=0.0,
        description="δ: weight of the entropy of each batch's mean prediction, maximized "
        "(keeps a task's predictions from collapsing onto a few classes); 0: AdaMerging's "
        "entropy alone",
    )
    seed: int = Field(0, description="seed of the batch order")


class CartAdaMergingParams(AdaMergingParams, LowRankSelection):
    init: float = Field(1.0, description="initial coefficient (CART's λ)")
    rank_ratio: float = Field(DEFAULT_RANK_RATIO, gt=0.0, le=1.0, description="CART's rank ratio")


def task_arithmetic_vectors(inputs: DataAwareInputs) -> tuple[StateDict, list[StateDict]]:
    origin = {k: v.to(torch.float32) for k, v in inputs.base.items() if v.is_floating_point()}
    vectors = [{k: s[k].to(torch.float32) - origin[k] for k in origin} for s in inputs.finetuned]
    return origin, vectors


def cart_vectors(
    inputs: DataAwareInputs, params: CartAdaMergingParams
) -> tuple[StateDict, list[StateDict]]:
    reference = inputs.finetuned[0]
    origin, vectors = {}, [{} for _ in inputs.finetuned]
    for key, value in reference.items():
        if not value.is_floating_point():
            continue
        thetas = [s[key].to(inputs.device, torch.float32) for s in inputs.finetuned]
        average = mean_of(thetas)
        origin[key] = average.cpu()
        if params.selects(key, value.shape):
            k = rank_for(value.shape, params.rank_ratio)
            for t, f in enumerate(factorize_centered(thetas, k, average).factors):
                vectors[t][key] = low_rank_sum([f], f.rank).cpu()
    return origin, vectors


class _Batches:
    """Seeded mini-batches of each task's samples, reshuffled every epoch."""

    def __init__(self, count: int, batch_size: int, seed: int):
        self.count, self.batch_size = count, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(count, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.position >= self.count:
            self.order, self.position = torch.randperm(self.count, generator=self.generator), 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch


def adapt(
    inputs: DataAwareInputs,
    origin: StateDict,
    vectors: list[StateDict],
    params: AdaMergingParams,
) -> MergeOutcome:
    """Learn the coefficients by entropy minimization; returns the merged state and, as
    info, the coefficients and the mean entropy before and after."""
    device = inputs.device
    model = inputs.model.to(device).eval()
    keys = [k for k in visual_keys(origin) if any(k in v for v in vectors)]
    layers = len(keys) if params.granularity == "layer" else 1
    num_tasks = len(vectors)
    coefficients = torch.full((num_tasks, layers), params.init, device=device, requires_grad=True)
    stacked = {
        k: torch.stack([v.get(k, torch.zeros_like(origin[k])) for v in vectors]).to(device)
        for k in keys
    }
    fixed = {k.removeprefix("visual."): origin[k].to(device) for k in visual_keys(origin)}
    samples = [s.images[: params.samples].to(device) for s in inputs.samples]
    heads = [s.head.to(device) for s in inputs.samples]
    batches = [_Batches(len(x), params.batch_size, params.seed + t) for t, x in enumerate(samples)]
    running = [None] * num_tasks
    kept = [0] * num_tasks
    seen = [0] * num_tasks

    def tower_params():
        merged = dict(fixed)
        for layer, key in enumerate(keys):
            weights = coefficients[:, layer if layers > 1 else 0]
            delta = (
                weights.reshape((num_tasks,) + (1,) * (stacked[key].ndim - 1)) * stacked[key]
            ).sum(0)
            name = key.removeprefix("visual.")
            merged[name] = fixed[name] + delta
        return merged

    def measure() -> tuple[float, float]:
        """Mean over tasks of the mean entropy, and of the objective, on all samples."""
        entropies, objectives = [], []
        with torch.no_grad():
            params_now = tower_params()
            for x, head in zip(samples, heads, strict=True):
                logits = image_logits(model, params_now, x, head)
                entropies.append(entropy(logits).mean().item())
                diverse = float(_marginal_entropy(logits))
                objectives.append(entropies[-1] - params.diversity * diverse)
        return sum(entropies) / num_tasks, sum(objectives) / num_tasks

    before, objective_before = measure()
    optimizer = torch.optim.Adam([coefficients], lr=params.lr)
    for _ in range(params.steps):
        optimizer.zero_grad()
        merged = tower_params()
        loss = torch.zeros((), device=device)
        for t in range(num_tasks):
            batch = samples[t][batches[t].next().to(device)]
            logits = image_logits(model, merged, batch, heads[t])
            h = entropy(logits)
            weight = torch.ones_like(h)
            if params.select == "eata":
                weight = _eata_weights(logits.detach(), h.detach(), params, running, t)
            seen[t] += len(h)
            kept[t] += int((weight > 0).sum())
            if weight.sum() > 0:
                loss = loss + (weight * h).sum() / weight.sum()
            if params.diversity:
                loss = loss - params.diversity * _marginal_entropy(logits)
        if loss.requires_grad:
            loss.backward()
            optimizer.step()
    after, objective_after = measure()

    learned = coefficients.detach().cpu()
    with torch.no_grad():
        tower = {f"visual.{k}": v.cpu() for k, v in tower_params().items()}
    merged_state = assemble(inputs.finetuned[0], tower, origin, vectors, params.init)
    info = {
        "granularity": params.granularity,
        "coefficients": {
            s.name: [round(x, 5) for x in learned[t].tolist()] for t, s in enumerate(inputs.samples)
        },
        "layers": keys if layers > 1 else ["all"],
        "entropy_before": before,
        "entropy_after": after,
        "diversity": params.diversity,
        "objective_before": objective_before,
        "objective_after": objective_after,
        "samples_kept": {s.name: kept[t] / max(1, seen[t]) for t, s in enumerate(inputs.samples)},
    }
    return MergeOutcome(merged_state, info)


def _marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the mean softmax prediction over the rows of ``logits`` (N, C)."""
    mean = torch.softmax(logits, -1).mean(0)
    return -(mean * mean.clamp_min(1e-12).log()).sum()


def _eata_weights(logits, h, params: AdaMergingParams, running: list, task: int):
    probabilities = torch.softmax(logits, -1)
    e0 = params.entropy_margin * math.log(logits.shape[-1])
    keep = h < e0
    if running[task] is not None:
        similarity = torch.nn.functional.cosine_similarity(
            probabilities, running[task][None], dim=-1
        )
        keep &= similarity < params.redundancy
    if keep.any():
        mean = probabilities[keep].mean(0)
        running[task] = mean if running[task] is None else 0.9 * running[task] + 0.1 * mean
    return keep.float() * torch.exp(e0 - h)


def run_adamerging(inputs: DataAwareInputs, params: AdaMergingParams) -> MergeOutcome:
    origin, vectors = task_arithmetic_vectors(inputs)
    return adapt(inputs, origin, vectors, params)


def run_cart_adamerging(inputs: DataAwareInputs, params: CartAdaMergingParams) -> MergeOutcome:
    origin, vectors = cart_vectors(inputs, params)
    return adapt(inputs, origin, vectors, params)


ADAMERGING = DataAwareMethod(
    name="adamerging",
    summary="task-arithmetic coefficients per task and layer learned by entropy minimization",
    reference="Yang et al., AdaMerging, ICLR 2024",
    params=AdaMergingParams,
    run=run_adamerging,
)

CART_ADAMERGING = DataAwareMethod(
    name="cart_adamerging",
    summary="CART's rank-k centered vectors weighted by coefficients learned at test time",
    reference="Choi et al., Revisiting Weight Averaging for Model Merging, 2024 (CART + TTA)",
    params=CartAdaMergingParams,
    run=run_cart_adamerging,
)

METHODS = (ADAMERGING, CART_ADAMERGING)
