"""OPCM: continual merging by orthogonal projection, one model at a time.

Tang et al., "Merging Models on the Fly Without Retraining: A Sequential Approach to
Scalable Continual Model Merging", NeurIPS 2025 (the algorithm as ``fusion_bench.method.opcm``
runs it). Models arrive in order; R is the running sum of their (projected) task vectors
τ_t = θ_t − θ_0, with R = τ_1 after the first:

    each selected weight matrix:   R ← R + τ̃_t,   R = U Σ Vᵀ (thin SVD),
        τ̃_t = τ_t − U_r (U_rᵀ τ_t V_r) V_rᵀ − Σ_{i ≥ r, σ_i > tol} (u_iᵀ τ_t v_i) u_i v_iᵀ
        r = the first index at which cumsum(σ) / Σσ exceeds α (the protected directions)
    every other floating tensor:   R ← R + τ_t
    θ = θ_0 + (n̄ / ‖R‖) · R,   n̄ = the mean of the tasks' whole-model norms ‖τ_t‖

so the merged task vector has the tasks' mean norm. fusion_bench keeps θ_t and λ_t with
R = λ_t (θ_t − θ_0); keeping R is the same algorithm (the SVD of R has the subspace and the
split of that of θ_t − θ_0), and the thin SVD gives the same projection as its full one.

Choices that are ours, where the reference is silent or model-specific:

- the diagonal (``zero_diagonal``, as current fusion_bench does; the paper-era code's
  ``diag().fill_(0)`` did nothing, which ``zero_diagonal: false`` follows) is zeroed only
  where σ_i > tol: directions with σ = 0 are arbitrary, so zeroing along them would make the
  result depend on the SVD routine;
- open_clip's packed ``attn.in_proj_weight`` is projected as its three D × D blocks (q, k,
  v: the three Linear layers of a Hugging Face CLIP), and open_clip's ``proj`` is summed;
- ``fusion_bench_parity`` reproduces fusion_bench's Hugging Face CLIP quirk: there
  ``embeddings.class_embedding`` belongs to no leaf module, so it keeps the first model's
  vector (rescaled with the rest). Off by default.

``merge`` folds ``--finetuned`` in the order given. Memory: one key's tensors at a time;
R is spilled to disk (:mod:`mergeflow.spill`) until n̄ / ‖R‖ is known.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from mergeflow.architectures import stacked_maps
from mergeflow.methods.base import MergeMethod, Sweep
from mergeflow.methods.cart import LowRankSelection
from mergeflow.spill import TensorSpill


class OpcmParams(LowRankSelection):
    alpha: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="share of the running merge's singular mass whose directions are "
        "protected from each new task vector",
    )
    zero_diagonal: bool = Field(
        True,
        description="also remove the new vector's part along each of the merge's own "
        "singular pairs (current fusion_bench; false: the paper-era code)",
    )
    fusion_bench_parity: bool = Field(
        False,
        description="keep Hugging Face CLIP's class_embedding at the first model's vector, as "
        "fusion_bench does (a parity mode, not a recommendation)",
    )


def split_rank(s: torch.Tensor, alpha: float) -> int:
    """The number of protected directions: the first index at which the cumulative share
    of the singular values ``s`` (descending) exceeds ``alpha``; 0 if none does."""
    total = s.sum()
    if not total > 0:
        return 0
    above = (s.cumsum(0) / total) > alpha
    return int(above.float().argmax()) if bool(above.any()) else 0


def project_out(running: torch.Tensor, tau: torch.Tensor, alpha: float, zero_diagonal: bool):
    """τ̃: ``tau`` (m × n, float32) without its part in the protected subspace of
    ``running`` (m × n): the top-left r × r block of Uᵀ τ V and, with ``zero_diagonal``,
    its diagonal where σ_i > tol (max(m, n) · eps · σ_max)."""
    u, s, vh = torch.linalg.svd(running, full_matrices=False)
    r = split_rank(s, alpha)
    out = tau.clone()
    if r:
        u_r, vh_r = u[:, :r], vh[:r]
        out -= u_r @ ((u_r.T @ tau) @ vh_r.T) @ vh_r
    if zero_diagonal and s.numel() > r:
        tol = max(running.shape) * torch.finfo(s.dtype).eps * float(s[0])
        live = r + int((s[r:] > tol).sum())
        if live > r:
            u_d, vh_d = u[:, r:live], vh[r:live]
            along = ((u_d.T @ tau) * vh_d).sum(dim=1)  # u_iᵀ τ v_i for each pair
            out -= (u_d * along) @ vh_d
    return out


def keeps_first(key: str, params: OpcmParams) -> bool:
    """fusion_bench's quirk (parity mode): HF CLIP's class_embedding is in no leaf module."""
    return params.fusion_bench_parity and key.endswith("embeddings.class_embedding")


def fold(key: str, running: torch.Tensor, tau: torch.Tensor, params: OpcmParams):
    """One arrival on one key: the new running sum R + τ̃ (matrices) or R + τ (others)."""
    if not params.selects(key, running.shape):
        return running + tau
    maps = stacked_maps(key, running.shape)
    projected = [
        project_out(r, t, params.alpha, params.zero_diagonal)
        for r, t in zip(running.chunk(maps), tau.chunk(maps), strict=True)
    ]
    return running + torch.cat(projected)


def rescale(task_norms: Sequence[float], running_norm: float) -> float:
    """n̄ / ‖R‖: what makes the merged vector's norm the tasks' mean norm (1 if R is 0)."""
    return sum(task_norms) / len(task_norms) / running_norm if running_norm > 0 else 1.0


def _square(tensor: torch.Tensor) -> float:
    return float(tensor.double().square().sum())


@dataclass
class OpcmContext:
    spill: TensorSpill
    scale: float


def prepare(sweep: Sweep, params: OpcmParams) -> OpcmContext:
    """One pass: each key's R folded over the T task vectors in order and spilled, the
    tasks' norms and, per arrival, ‖R_t‖² summed; then n̄ / ‖R_T‖."""
    spill = TensorSpill()
    task_squares: list[float] = []
    running_squares: list[float] = []  # Σ over keys of ‖R_t‖², per arrival t
    first_only: dict[str, torch.Tensor] = {}
    for key, finetuned, base in sweep():
        task_vectors = [theta - base for theta in finetuned]
        if not task_squares:
            task_squares = [0.0] * len(task_vectors)
            running_squares = [0.0] * len(task_vectors)
        for t, tau in enumerate(task_vectors):
            task_squares[t] += _square(tau)
        if keeps_first(key, params):
            first_only[key] = task_vectors[0].cpu()
            continue
        running = task_vectors[0].clone()
        running_squares[0] += _square(running)
        for t, tau in enumerate(task_vectors[1:], start=1):
            running = fold(key, running, tau, params)
            running_squares[t] += _square(running)
        spill.append(key, running)
    task_norms = [math.sqrt(q) for q in task_squares] or [0.0]
    scale = 1.0  # 1 / λ_1: the first model is the merge
    for t in range(1, len(task_norms)):
        # fusion_bench rescales the merge in place each step, so a key it never merges
        # (first_only) ends as R_t = R_{t-1} / λ_{t-1}
        first_only = {k: v * scale for k, v in first_only.items()}
        total = running_squares[t] + sum(_square(v) for v in first_only.values())
        scale = rescale(task_norms[: t + 1], math.sqrt(total))
    for key, running in first_only.items():
        spill.append(key, running)
    return OpcmContext(spill, scale)


def merge_tensor(key, finetuned, base, params: OpcmParams, context: OpcmContext):
    return base + context.scale * context.spill.get(key).to(base.device)


METHOD = MergeMethod(
    name="opcm",
    summary="continual: each model in turn, projected off the running merge's top "
    "directions, rescaled to the tasks' mean norm",
    reference="Tang et al., Merging Models on the Fly Without Retraining (OPCM), NeurIPS 2025",
    params=OpcmParams,
    merge_tensor=merge_tensor,
    uses_base=True,
    prepare=prepare,
)
