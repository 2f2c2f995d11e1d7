"""Truncated SVD helpers shared by every low-rank method.

All factorization runs in float32 on the chosen device; callers cast results back to the
checkpoint's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) picks CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def rank_for(shape: Sequence[int], rank_ratio: float) -> int:
    """Number of singular triplets kept for a matrix of ``shape``:
    ``k = max(1, int(rank_ratio * min(m, n)))``."""
    m, n = shape
    return max(1, int(rank_ratio * min(m, n)))


@dataclass(frozen=True)
class Factors:
    """Top singular triplets of one matrix: ``u`` (m, k), ``s`` (k,), ``vh`` (k, n), float32.

    ``u @ diag(s) @ vh`` is the best rank-k approximation of the matrix.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @property
    def rank(self) -> int:
        return self.s.shape[0]

    def to(self, device: torch.device) -> Factors:
        return Factors(self.u.to(device), self.s.to(device), self.vh.to(device))


def truncated_svd(matrix: torch.Tensor, k: int) -> Factors:
    """Top-``k`` singular triplets of a 2-D float32 ``matrix`` (m, n), on its device."""
    if matrix.ndim != 2:
        raise ValueError(f"truncated_svd expects a matrix, got shape {tuple(matrix.shape)}")
    m, n = matrix.shape
    if m < n:
        # LAPACK is about twice as fast on tall matrices; A = U S Vh  <=>  Aᵀ = V S Uᵀ
        v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
        return Factors(uh[:k].T.contiguous(), s[:k].contiguous(), v[:, :k].T.contiguous())
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return Factors(u[:, :k].contiguous(), s[:k].contiguous(), vh[:k].contiguous())


def low_rank_sum(factors: Sequence[Factors], k: int) -> torch.Tensor:
    """``Σ_t U_t[:, :k] diag(S_t[:k]) Vh_t[:k]`` as one (m, Tk) @ (Tk, n) product, float32."""
    if not factors:
        raise ValueError("low_rank_sum needs at least one set of factors")
    for f in factors:
        if f.rank < k:
            raise ValueError(f"factors hold rank {f.rank}, asked for rank {k}")
    left = torch.cat([f.u[:, :k] for f in factors], dim=1)
    right = torch.cat([f.s[:k, None] * f.vh[:k] for f in factors], dim=0)
    return left @ right
