"""Task arithmetic: θ = θ_0 + λ · Σ_t (θ_t − θ_0).

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergeflow.methods.base import MergeMethod, MethodParams


class TaskArithmeticParams(MethodParams):
    scale: float = Field(0.3, description="λ, the weight of the summed task vectors")


def merge_tensor(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: TaskArithmeticParams,
) -> torch.Tensor:
    assert base is not None
    task_vector_sum = torch.stack([theta - base for theta in finetuned]).sum(0)
    return base + params.scale * task_vector_sum


METHOD = MergeMethod(
    name="task_arithmetic",
    summary="base plus scale times the sum of task vectors",
    reference="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
    params=TaskArithmeticParams,
    merge_tensor=merge_tensor,
    uses_base=True,
)
