"""TIES-merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.

Each task vector keeps its top ``density`` fraction of entries by magnitude, counted over the
whole model as in the paper (``trim: model``) or within each tensor (``trim: tensor``, as
mergekit does); a sign is elected per entry by summed mass; the entries that agree with it
are averaged (``aggregate: mean``, the paper's disjoint mean) or summed;
θ = origin + λ · result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from mergeflow.methods.base import MergeMethod, Sweep
from mergeflow.methods.task_vectors import (
    TaskVectorParams,
    elect_and_merge,
    magnitude_trim,
    origin_and_vectors,
    tensor_thresholds,
    trim_thresholds,
    uses_base,
)


class TiesParams(TaskVectorParams):
    density: float = Field(
        0.2, gt=0.0, le=1.0, description="fraction of each task vector's entries kept"
    )
    scale: float = Field(1.0, description="λ, the weight of the merged task vector")
    aggregate: Literal["mean", "sum"] = Field(
        "mean", description="disjoint mean (the paper) or sum of the agreeing entries"
    )
    trim: Literal["model", "tensor"] = Field(
        "model",
        description="where density is counted: over the whole model (the paper) or within "
        "each tensor (mergekit; no extra pass over the model)",
    )


def trims_model_wide(params: TiesParams) -> bool:
    """Model-wide thresholds make every entry's rule local; a tensor's own need all of it."""
    return params.trim == "model"


def prepare(sweep: Sweep, params: TiesParams) -> list[float] | None:
    if params.trim == "tensor":
        return None  # each tensor's own thresholds, in merge_tensor
    return trim_thresholds(sweep, params.density, params.center)


def merge_tensor(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: TiesParams,
    thresholds: list[float] | None,
) -> torch.Tensor:
    origin, task_vectors = origin_and_vectors(finetuned, base, params.center)
    if params.trim == "tensor":
        thresholds = tensor_thresholds(task_vectors, params.density)
    trimmed = magnitude_trim(task_vectors, thresholds)
    return origin + params.scale * elect_and_merge(trimmed, params.aggregate)


METHOD = MergeMethod(
    name="ties",
    summary="trim task vectors to their largest entries, elect signs, disjoint mean",
    reference="Yadav et al., TIES-Merging, NeurIPS 2023",
    params=TiesParams,
    merge_tensor=merge_tensor,
    uses_base=uses_base,
    prepare=prepare,
    elementwise=trims_model_wide,
)
