"""Truncated SVD helpers shared by every low-rank method.

Factors come out in float32 on the input's device; callers cast results back to the
checkpoint's dtype. On CPU, a top-k with k at most a quarter of min(m, n) (every CART rank
of a usual grid, TSV-M's 1/T for T ≥ 4) comes from the float64 Gram matrix's top eigenpairs
instead of a full LAPACK SVD (see :func:`truncated_svd`); on CUDA, :func:`truncated_svds`
factorizes a key's T matrices as one batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergeflow.errors import ParameterError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) picks CUDA when available, else CPU; asking for CUDA on a machine
    without it is an error that says so."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {device!r} asked for, but CUDA is not available here")
    if resolved.type not in ("cpu", "cuda"):
        raise ParameterError(f"device {device!r}: mergeflow runs on cpu or cuda")
    return resolved


def rank_for(shape: Sequence[int], rank_ratio: float) -> int:
    """Number of singular triplets kept for a matrix of ``shape``:
    ``k = max(1, int(rank_ratio * min(m, n)))``."""
    m, n = shape
    return max(1, int(rank_ratio * min(m, n)))


def energy_rank(s: torch.Tensor, energy: float, total: float | None = None) -> int:
    """The smallest k whose top singular values hold ``energy`` of the squared Frobenius
    norm: Σ_{i≤k} s_i² ≥ energy · total, with ``total`` = Σ s_i² over the whole spectrum
    (give it when ``s`` is truncated). At least 1; a zero matrix gives 1."""
    squares = s.double() ** 2
    total = float(squares.sum()) if total is None else total
    if total <= 0:
        return 1
    reached = torch.cumsum(squares, 0) >= energy * total * (1 - 1e-12)
    if not bool(reached.any()):
        return s.shape[0] + 1  # more than the factors hold
    return max(1, int(torch.argmax(reached.to(torch.int8))) + 1)


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


# The Gram route below serves a top-k up to this share of min(m, n). Past it the kept
# triplets reach small singular values, where B v / s loses orthogonality; LAPACK serves
# those (the energy rule asks for every triplet).
GRAM_MAX_SHARE = 0.25
# A kept singular value under this fraction of the largest is numerically zero in the Gram
# matrix (its eigenvalue is near float64's rounding of λ₁): its left vector would be noise,
# so such a matrix goes to LAPACK.
GRAM_RANK_TOLERANCE = 1e-6


def truncated_svd(matrix: torch.Tensor, k: int) -> Factors:
    """Top-``k`` singular triplets of a 2-D float32 ``matrix`` (m, n), on its device.

    On CPU with k ≤ ``GRAM_MAX_SHARE`` · min(m, n): with B the tall orientation (p, q),
    the top-k eigenpairs (λ_i, v_i) of BᵀB in float64 give V, and U diag(S) = B V, so
    S = column norms of B V and U = B V / S. Forming BᵀB costs p·q², less than LAPACK's
    bidiagonalization, and float64 keeps every singular value above ~1e-8 · s₁ as sharp as
    float32 LAPACK does (its reconstruction agrees with the full SVD to ~1e-6 relative; the
    test checks 1e-5 on steep, flat and low-rank-plus-noise spectra). A matrix whose top k
    reach numerically zero singular values (rank below k) falls back to LAPACK, whose
    vectors there are still orthonormal.
    """
    if matrix.ndim != 2:
        raise ValueError(f"truncated_svd expects a matrix, got shape {tuple(matrix.shape)}")
    if matrix.device.type == "cpu" and k <= GRAM_MAX_SHARE * min(matrix.shape):
        factors = _gram_svd(matrix, k)
        if factors is not None:
            return factors
    return lapack_svd(matrix, k)


def truncated_svds(matrices: Sequence[torch.Tensor], k: int) -> list[Factors]:
    """:func:`truncated_svd` of each of T matrices of one shape. On CUDA they are stacked
    (T, m, n) and factorized as one batched SVD, so one key costs one solver launch; on CPU
    one at a time (no (T, m, n) copy)."""
    if not matrices:
        return []
    if matrices[0].device.type != "cuda":
        return [truncated_svd(matrix, k) for matrix in matrices]
    batch = lapack_svd(torch.stack(list(matrices)), k)
    return [Factors(u, s, vh) for u, s, vh in zip(batch.u, batch.s, batch.vh, strict=True)]


def lapack_svd(matrix: torch.Tensor, k: int) -> Factors:
    """Top-``k`` triplets from a full thin ``torch.linalg.svd`` of ``matrix`` (m, n), or of
    a batch (T, m, n) at once (then each factor has the leading T); the reference the fast
    route is checked against."""
    m, n = matrix.shape[-2:]
    if m < n:
        # LAPACK is about twice as fast on tall matrices; A = U S Vh  <=>  Aᵀ = V S Uᵀ
        v, s, uh = torch.linalg.svd(matrix.mT, full_matrices=False)
        return Factors(
            uh[..., :k, :].mT.contiguous(), s[..., :k].contiguous(), v[..., :k].mT.contiguous()
        )
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return Factors(u[..., :k].contiguous(), s[..., :k].contiguous(), vh[..., :k, :].contiguous())


def _gram_svd(matrix: torch.Tensor, k: int) -> Factors | None:
    """Top-k triplets from the float64 Gram matrix of ``matrix``'s tall orientation, or
    None when the top k are not all numerically non-zero."""
    m, n = matrix.shape
    tall = (matrix if m >= n else matrix.T).double()  # (p, q), p ≥ q
    q = tall.shape[1]
    # LAPACK's partial solver (dsyevr through scipy) was slower here: its threads fight
    # torch's for the cores (bench/factorize.py, 2026-12-03)
    v = torch.linalg.eigh(tall.T @ tall).eigenvectors[:, q - k :].flip(1)  # (q, k), descending
    us = tall @ v  # (p, k) = U diag(S)
    s = torch.linalg.vector_norm(us, dim=0)
    order = torch.argsort(s, descending=True)  # eigenvalue order, made exact for the norms
    v, us, s = v[:, order], us[:, order], s[order]
    if not bool(s[-1] > GRAM_RANK_TOLERANCE * s[0]):
        return None
    u = (us / s).float()
    s, v = s.float(), v.float()
    if m >= n:
        return Factors(u.contiguous(), s.contiguous(), v.T.contiguous())
    return Factors(v.contiguous(), s.contiguous(), u.T.contiguous())


def low_rank_sum(
    factors: Sequence[Factors], k: int | Sequence[int], start: int | Sequence[int] = 0
) -> torch.Tensor:
    """``Σ_t U_t[:, a_t:k_t] diag(S_t[a_t:k_t]) Vh_t[a_t:k_t]`` as one (m, Σ(k−a)) @
    (Σ(k−a), n) product, float32; ``k`` (and ``start`` a, default 0) is one rank for every
    task or one per task. A start above 0 gives what ranks a..k add to the rank-a sum."""
    if not factors:
        raise ValueError("low_rank_sum needs at least one set of factors")
    ranks = [k] * len(factors) if isinstance(k, int) else list(k)
    starts = [start] * len(factors) if isinstance(start, int) else list(start)
    for f, first, rank in zip(factors, starts, ranks, strict=True):
        if f.rank < rank:
            raise ValueError(f"factors hold rank {f.rank}, asked for rank {rank}")
        if not 0 <= first <= rank:
            raise ValueError(f"start {first} is outside ranks 0..{rank}")
    spans = list(zip(factors, starts, ranks, strict=True))
    left = torch.cat([f.u[:, a:r] for f, a, r in spans], dim=1)
    right = torch.cat([f.s[a:r, None] * f.vh[a:r] for f, a, r in spans], dim=0)
    return left @ right


def orthogonalize(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``U @ Vh`` of ``matrix = U S Vh``: the nearest matrix with
    orthonormal columns (tall) or rows (wide), same shape, float32."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def factors_to_tensors(factors: Mapping[str, Sequence[Factors]]) -> dict[str, torch.Tensor]:
    """Per-key, per-task factors as flat tensors ``u/{t}/{key}``, ``s/{t}/{key}``,
    ``vh/{t}/{key}``, for saving in one safetensors file."""
    tensors = {}
    for key, task_factors in factors.items():
        for t, f in enumerate(task_factors):
            tensors[f"u/{t}/{key}"] = f.u
            tensors[f"s/{t}/{key}"] = f.s
            tensors[f"vh/{t}/{key}"] = f.vh
    return tensors


def factors_from_tensors(
    tensors: Mapping[str, torch.Tensor], keys: Sequence[str], num_tasks: int
) -> dict[str, list[Factors]]:
    """The inverse of :func:`factors_to_tensors`, for those of ``keys`` that have factors."""
    return {
        key: [
            Factors(tensors[f"u/{t}/{key}"], tensors[f"s/{t}/{key}"], tensors[f"vh/{t}/{key}"])
            for t in range(num_tasks)
        ]
        for key in keys
        if f"u/0/{key}" in tensors
    }


def factors_bytes(factors: Mapping[str, Sequence[Factors]]) -> int:
    return sum(
        x.numel() * x.element_size()
        for task_factors in factors.values()
        for f in task_factors
        for x in (f.u, f.s, f.vh)
    )
