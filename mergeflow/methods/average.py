"""Weight averaging: θ = mean_t θ_t.

Wortsman et al., "Model soups", ICML 2022; the CART paper's starting point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergeflow.methods.base import MergeMethod, MethodParams
from mergeflow.statedict import mean_of


class AverageParams(MethodParams):
    pass


def merge_tensor(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: AverageParams,
    context=None,
) -> torch.Tensor:
    return mean_of(finetuned)


METHOD = MergeMethod(
    name="average",
    summary="plain weight averaging of the fine-tuned models",
    reference="Wortsman et al., Model soups, ICML 2022",
    params=AverageParams,
    merge_tensor=merge_tensor,
    uses_base=False,
    elementwise=True,
)
