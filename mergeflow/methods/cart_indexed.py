"""CART as compression: task t's model rebuilt from θ_avg and its own rank-k centered vector.

Choi et al., "Revisiting Weight Averaging for Model Merging" (2024), the compression use:

    θ_t ≈ θ_avg + SVD_k(θ_t − θ_avg)     on selected matrices
    θ_t  = θ_avg + (θ_t − θ_avg)          elsewhere (small tensors, kept exactly)

As a merge method it builds one task's model (``task``, the index of its checkpoint);
:class:`mergeflow.cart_index.CartIndex` stores θ_avg plus every task's factors once and
rebuilds any task on demand. At full rank every task's model comes back exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergeflow.kernels.cart import DEFAULT_RANK_RATIO, centered, factorize_task_vector
from mergeflow.methods.base import MergeMethod, check_task_index
from mergeflow.methods.cart import LowRankSelection
from mergeflow.svd import low_rank_sum


class CartIndexedParams(LowRankSelection):
    task: int = Field(ge=0, description="index of the task (its fine-tuned checkpoint) to build")
    rank_ratio: float = Field(
        DEFAULT_RANK_RATIO,
        gt=0.0,
        le=1.0,
        description="fraction of min(m, n) singular triplets kept",
    )
    energy: float | None = Field(
        None, gt=0.0, le=1.0, description="instead of rank_ratio: share of ‖τ̄_t‖² kept"
    )


def merge_tensor(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: CartIndexedParams,
    context=None,
) -> torch.Tensor:
    check_task_index("cart_indexed", params.task, len(finetuned))
    average, task_vectors = centered(finetuned)
    tau = task_vectors[params.task]
    if not params.selects(key, average.shape):
        return average + tau
    factors = factorize_task_vector(tau, params.rank_ratio, params.energy)
    return average + low_rank_sum([factors], factors.rank)


METHOD = MergeMethod(
    name="cart_indexed",
    per_task=True,
    summary="task t's model from θ_avg plus its rank-k centered task vector (compression)",
    reference="Choi et al., Revisiting Weight Averaging for Model Merging, 2024",
    params=CartIndexedParams,
    merge_tensor=merge_tensor,
    uses_base=False,
)
