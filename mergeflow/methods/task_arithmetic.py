"""Task arithmetic: θ = θ_0 + λ · Σ_t (θ_t − θ_0).

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. With ``center: average``
the origin is θ_avg and the centered vectors sum to zero, so the result is weight averaging.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergeflow.methods.base import MergeMethod
from mergeflow.methods.task_vectors import TaskVectorParams, origin_and_vectors, uses_base
from mergeflow.statedict import sum_of


class TaskArithmeticParams(TaskVectorParams):
    scale: float = Field(0.3, description="λ, the weight of the summed task vectors")


def merge_tensor(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: TaskArithmeticParams,
    context=None,
) -> torch.Tensor:
    origin, task_vectors = origin_and_vectors(finetuned, base, params.center)
    return origin + params.scale * sum_of(task_vectors)


METHOD = MergeMethod(
    name="task_arithmetic",
    summary="base plus scale times the sum of task vectors",
    reference="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
    params=TaskArithmeticParams,
    merge_tensor=merge_tensor,
    uses_base=uses_base,
    elementwise=True,
)
