"""TSV-M: Task Singular Vectors merging.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
CVPR 2025.

For each selected matrix, every task vector keeps its top k = int(min(m, n) / T) singular
triplets; the kept left and right singular vectors of all tasks are concatenated and each
concatenation is replaced by its nearest orthogonal matrix, which removes the interference
between tasks' subspaces:

    U = [U_1,k … U_T,k],  Σ = diag(Σ_1,k … Σ_T,k),  V = [V_1,k … V_T,k]
    Δ = ⊥(U) Σ ⊥(V)ᵀ,     θ = origin + α · Δ

Other tensors take the mean task vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergeflow.methods.base import MergeMethod
from mergeflow.methods.cart import AllMatrices
from mergeflow.methods.task_vectors import TaskVectorParams, merge_matrices, uses_base
from mergeflow.svd import orthogonalize, truncated_svds


class TsvParams(TaskVectorParams, AllMatrices):
    scale: float = Field(1.0, description="α, the weight of the merged task vector")


def merge_task_singular_vectors(task_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Δ for one (m, n) matrix from its T task vectors; zeros when min(m, n) < T."""
    k = int(min(task_vectors[0].shape) / len(task_vectors))
    if k == 0:
        return torch.zeros_like(task_vectors[0])
    factors = truncated_svds(task_vectors, k)
    u = orthogonalize(torch.cat([f.u for f in factors], dim=1))
    vh = orthogonalize(torch.cat([f.vh for f in factors], dim=0))
    s = torch.cat([f.s for f in factors])
    return (u * s) @ vh


def merge_tensor(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: TsvParams,
    context=None,
) -> torch.Tensor:
    return merge_matrices(key, finetuned, base, params, merge_task_singular_vectors)


METHOD = MergeMethod(
    name="tsv_m",
    summary="per matrix, each task's top 1/T singular vectors, concatenated and orthogonalized",
    reference="Gargiulo et al., Task Singular Vectors, CVPR 2025",
    params=TsvParams,
    merge_tensor=merge_tensor,
    uses_base=uses_base,
)
