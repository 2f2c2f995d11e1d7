"""LoRA-LEGO: every rank-one unit of every adapter pooled, clustered, one merged adapter.

Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes
Through Rank-Wise Clustering", ICLR 2025. A LoRA's rank-one units (its Minimal Semantic
Units, column j of B with row j of A) can be reordered and concatenated freely: Σ_t B_t A_t
is one LoRA holding every unit. LoRA-LEGO pools the units of all adapters, per adapted
matrix, clusters them into k groups and keeps one unit per group, so the merge is one
adapter of rank k. No official code was found; what the paper's abstract leaves open is
ours, as follows:

- each unit (b_j, a_j), the adapter's scale folded into b, is taken as a direction and a
  magnitude: σ_j = ‖b_j‖‖a_j‖, (b̂_j, â_j) the unit vectors, the sign fixed so that â_j's
  largest entry is positive ((−b, −a) is the same unit);
- the units are clustered by k-means (k-means++ start, seeded; ``iterations``) on the
  concatenated [b̂_j, â_j], every unit weighted by σ_j, so weak units do not pull centroids;
- each cluster gives one unit: the centroid's halves, normalized (the paper's reweighting
  for norm decay: a mean of unit vectors is shorter than one), with the magnitude that
  fits the members' sum best, σ_c = Σ_{j∈c} σ_j (b̂_cᵀ b̂_j)(â_cᵀ â_j) (least squares of
  σ b̂_c â_cᵀ against Σ_{j∈c} σ_j b̂_j â_jᵀ);
- ΔW = λ Σ_c σ_c b̂_c â_cᵀ. With k = Σ_t r_t every unit is its own cluster and this is task
  arithmetic with λ; fewer clusters merge what points the same way.

Write it as an adapter with ``--out-format lora --rank K`` (the delta has rank ≤ k).
"""

from __future__ import annotations

import hashlib

import torch
from pydantic import Field

from mergeflow.methods.base import MergeMethod, MethodParams, factors_only


class LoraLegoParams(MethodParams):
    rank: int | None = Field(
        None, ge=1, description="k, the merged adapter's rank (default: the largest input rank)"
    )
    scale: float = Field(1.0, description="λ, the weight of the merged delta (Σ of the units)")
    iterations: int = Field(50, ge=1, description="k-means iterations")
    seed: int = Field(0, description="seeds k-means++ (per matrix, with its key)")


def units_of(factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank-one unit of every adapter of one matrix: (B̂ m × N, Â N × n, σ N)."""
    b = torch.cat([f[0] for f in factors], dim=1)
    a = torch.cat([f[1] for f in factors], dim=0)
    b_norm, a_norm = b.norm(dim=0), a.norm(dim=1)
    live = (b_norm > 0) & (a_norm > 0)
    b_hat, a_hat = b[:, live] / b_norm[live], a[live] / a_norm[live, None]
    peak = a_hat.gather(1, a_hat.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    sign = torch.where(peak < 0, -1.0, 1.0)
    return b_hat * sign, a_hat * sign[:, None], b_norm[live] * a_norm[live]


def weighted_kmeans(points, weights, k: int, iterations: int, generator) -> torch.Tensor:
    """Cluster labels of ``points`` (N × d) into ``k`` groups by weighted k-means with a
    k-means++ start."""
    n = points.shape[0]
    first = int(torch.multinomial(weights, 1, generator=generator))
    centers = [points[first]]
    nearest = (points - centers[0]).square().sum(1)
    for _ in range(1, k):
        chance = nearest * weights
        pick = int(torch.multinomial(chance, 1, generator=generator)) if chance.sum() > 0 else 0
        centers.append(points[pick])
        nearest = torch.minimum(nearest, (points - points[pick]).square().sum(1))
    center = torch.stack(centers)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        new = torch.cdist(points, center).argmin(dim=1)
        if torch.equal(new, labels) and _ > 0:
            break
        labels = new
        for c in range(k):
            members = labels == c
            if members.any():
                w = weights[members, None]
                center[c] = (points[members] * w).sum(0) / w.sum()
    return labels


def merge_factors(key, factors, base, params: LoraLegoParams, context=None) -> torch.Tensor:
    b_hat, a_hat, sigma = units_of(factors)
    total = sigma.numel()
    k = params.rank or max(f[1].shape[0] for f in factors)
    if total == 0:
        return base.clone()
    if k >= total:
        return base + params.scale * (b_hat * sigma) @ a_hat
    seed = hashlib.sha256(f"{params.seed}/{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(seed[:8], "little") >> 1)
    points = torch.cat([b_hat.T, a_hat], dim=1).cpu()
    labels = weighted_kmeans(points, sigma.cpu(), k, params.iterations, generator).to(b_hat.device)
    delta = torch.zeros_like(base)
    for c in range(k):
        members = labels == c
        if not members.any():
            continue
        w = sigma[members]
        b_c = (b_hat[:, members] * w).sum(1)
        a_c = (a_hat[members] * w[:, None]).sum(0)
        if not (b_c.norm() > 0 and a_c.norm() > 0):
            continue  # members that cancel out stand for nothing
        b_c, a_c = b_c / b_c.norm(), a_c / a_c.norm()
        fit = (w * (b_c @ b_hat[:, members]) * (a_hat[members] @ a_c)).sum()
        delta += fit * torch.outer(b_c, a_c)
    return base + params.scale * delta


METHOD = MergeMethod(
    name="lora_lego",
    summary="LoRA adapters' rank-one units pooled and clustered into one rank-k adapter",
    reference="Zhao et al., Merging LoRAs like Playing LEGO, ICLR 2025",
    params=LoraLegoParams,
    merge_tensor=factors_only("lora_lego", "unit by unit"),
    uses_base=True,
    merge_factors=merge_factors,
)
