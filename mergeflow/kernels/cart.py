"""CART's kernel: the centered task vectors of one tensor and their truncated SVDs.

Choi et al., "Revisiting Weight Averaging for Model Merging" (2024):

    θ_avg = mean_t θ_t,    τ̄_t = θ_t − θ_avg,    SVD_k(τ̄_t) = U_k diag(S_k) V_kᵀ

Every CART variant is built from these few functions, so centering, the rank rule and the
energy rule live here once: the merge (:mod:`mergeflow.methods.cart`), the grid of (rank,
scale) points from one factorization (:mod:`mergeflow.cart_grid`), task t's model for
compression (:mod:`mergeflow.methods.cart_indexed`, :mod:`mergeflow.cart_index`) and CART +
AdaMerging's task vectors (:mod:`mergeflow.data_aware.adamerging`). Tensors are float32, on
whatever device they come in; factors stay on that device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergeflow.kernels import DEFAULT_RANK_RATIO
from mergeflow.statedict import mean_of
from mergeflow.svd import Factors, energy_rank, rank_for, truncated_svd, truncated_svds

__all__ = [
    "DEFAULT_RANK_RATIO",
    "CenteredFactors",
    "centered",
    "energy_ranks",
    "factorize_centered",
    "factorize_task_vector",
    "kept_ranks",
]


def centered(finetuned: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """θ_avg and the centered task vectors τ̄_t = θ_t − θ_avg (T tensors of one shape)."""
    average = mean_of(finetuned)
    return average, [theta - average for theta in finetuned]


@dataclass(frozen=True)
class CenteredFactors:
    """One matrix's θ_avg (m, n), each task's top-k triplets of τ̄_t, and ‖τ̄_t‖²_F (T,)."""

    average: torch.Tensor
    factors: list[Factors]
    norms2: torch.Tensor


def factorize_centered(
    finetuned: Sequence[torch.Tensor], k: int, average: torch.Tensor | None = None
) -> CenteredFactors:
    """θ_avg and the rank-``k`` factors of every τ̄_t of one (m, n) matrix, with each
    ‖τ̄_t‖²_F (what the energy rule measures against). One centered vector is alive at a
    time: only its kept factors outlive its SVD, so memory does not grow with T beyond the
    T input tensors. ``average`` may be given when the caller holds it already. On CUDA the
    T centered vectors are factorized as one batch instead (memory is not the limit there)."""
    average = mean_of(finetuned) if average is None else average
    if average.device.type == "cuda":
        taus = [theta - average for theta in finetuned]
        norms2 = torch.stack([tau.square().sum() for tau in taus])
        return CenteredFactors(average, truncated_svds(taus, k), norms2)
    factors, norms2 = [], []
    for theta in finetuned:
        tau = theta - average
        factors.append(truncated_svd(tau, k))
        norms2.append(tau.square().sum())
    return CenteredFactors(average, factors, torch.stack(norms2))


def energy_ranks(factors: Sequence[Factors], norms2: torch.Tensor, energy: float) -> list[int]:
    """Per task, the smallest rank whose singular values hold ``energy`` of ‖τ̄_t‖²_F; more
    than a task's factors hold when they are too few (the caller decides what that means)."""
    return [
        energy_rank(f.s, energy, total) for f, total in zip(factors, norms2.tolist(), strict=True)
    ]


def kept_ranks(
    factors: Sequence[Factors], norms2: torch.Tensor, rank_ratio: float, energy: float | None
) -> list[int]:
    """The rank CART keeps of each task's factors: k = max(1, int(rank_ratio · min(m, n))),
    or, with ``energy``, the energy rule's rank (at most what the factors hold)."""
    if energy is None:
        k = rank_for((factors[0].u.shape[0], factors[0].vh.shape[1]), rank_ratio)
        return [min(k, f.rank) for f in factors]
    return [
        min(k, f.rank) for k, f in zip(energy_ranks(factors, norms2, energy), factors, strict=True)
    ]


def factorize_task_vector(
    tau: torch.Tensor, rank_ratio: float = DEFAULT_RANK_RATIO, energy: float | None = None
) -> Factors:
    """The kept singular triplets of one centered task vector τ̄_t (m, n): the top
    int(rank_ratio · min(m, n)), or as many as hold ``energy`` of its squared norm."""
    if energy is None:
        return truncated_svd(tau, rank_for(tau.shape, rank_ratio))
    factors = truncated_svd(tau, min(tau.shape))
    k = min(energy_rank(factors.s, energy, float(tau.square().sum())), factors.rank)
    return Factors(factors.u[:, :k], factors.s[:k], factors.vh[:k])
