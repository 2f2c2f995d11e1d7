"""TALL masks and Consensus merging: which task needs which weight.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression",
ICML 2024.

With the multi-task vector τ_MTL = Σ_t τ_t, task t's mask keeps the entries where its own
vector outweighs what the others add:

    m_t = |τ_t| > λ · |τ_MTL − τ_t|

``tall_masks`` rebuilds task t's model as origin + m_t ⊙ τ_MTL (one model per task, chosen
with ``task``); ``consensus`` keeps the entries at least ``k`` tasks need and drops the
selfish (one task) and catastrophic (no task) ones: θ = origin + α · (Σ_t m_t ≥ k) ⊙ τ_MTL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergeflow.methods.base import MergeMethod, check_task_index
from mergeflow.methods.task_vectors import TaskVectorParams, origin_and_vectors, uses_base
from mergeflow.statedict import sum_of


class TallMaskParams(TaskVectorParams):
    mask_lambda: float = Field(0.6, ge=0.0, description="λ of the mask rule")


class TallMasksParams(TallMaskParams):
    task: int = Field(ge=0, description="index of the task (its fine-tuned checkpoint) to build")


class ConsensusParams(TallMaskParams):
    k: int = Field(2, ge=1, description="an entry is kept when at least k tasks' masks hold it")
    scale: float = Field(0.3, description="α, the weight of the masked multi-task vector")


def task_masks(task_vectors: Sequence[torch.Tensor], mask_lambda: float) -> torch.Tensor:
    """(T, *shape) bool: m_t = |τ_t| > λ |τ_MTL − τ_t|."""
    stacked = torch.stack(list(task_vectors))
    multi_task = stacked.sum(0)
    return stacked.abs() > mask_lambda * (multi_task - stacked).abs()


def merge_tall_mask(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: TallMasksParams,
    context=None,
) -> torch.Tensor:
    check_task_index("tall_masks", params.task, len(finetuned))
    origin, task_vectors = origin_and_vectors(finetuned, base, params.center)
    mask = task_masks(task_vectors, params.mask_lambda)[params.task]
    return origin + mask * sum_of(task_vectors)


def merge_consensus(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: ConsensusParams,
    context=None,
) -> torch.Tensor:
    origin, task_vectors = origin_and_vectors(finetuned, base, params.center)
    needed_by = task_masks(task_vectors, params.mask_lambda).sum(0)
    multi_task = sum_of(task_vectors)
    return origin + params.scale * (needed_by >= params.k) * multi_task


TALL_MASKS = MergeMethod(
    name="tall_masks",
    per_task=True,
    summary="task t's model from the multi-task vector under t's TALL mask (one per task)",
    reference="Wang et al., Localizing Task Information (TALL masks), ICML 2024",
    params=TallMasksParams,
    merge_tensor=merge_tall_mask,
    uses_base=uses_base,
)

CONSENSUS = MergeMethod(
    name="consensus",
    summary="task arithmetic on the weights at least k tasks' TALL masks keep",
    reference="Wang et al., Localizing Task Information (Consensus merging), ICML 2024",
    params=ConsensusParams,
    merge_tensor=merge_consensus,
    uses_base=uses_base,
)

METHODS = (TALL_MASKS, CONSENSUS)
