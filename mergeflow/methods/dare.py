"""DARE: drop and rescale task-vector entries, then combine.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch" (DARE), ICML 2024.

Each entry of each task vector is zeroed with probability ``p`` and the survivors are divided
by 1 − p, so every task vector keeps its expectation. The dropped vectors are then combined
by task arithmetic (sum) or by TIES (optionally trimmed to ``density``, sign election,
disjoint mean). The masks are seeded per (seed, key, task), so a merge is reproducible.
"""

from __future__ import annotations

import functools
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
    random_drop,
    trim_thresholds,
    uses_base,
)
from mergeflow.statedict import sum_of


class DareParams(TaskVectorParams):
    p: float = Field(0.5, ge=0.0, lt=1.0, description="drop rate of task-vector entries")
    seed: int = Field(0, description="seed of the drop masks")
    rescale: bool = Field(True, description="divide kept entries by 1 − p")
    combine: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="how the dropped task vectors are combined"
    )
    density: float = Field(
        1.0, gt=0.0, le=1.0, description="TIES trim after the drop (combine: ties only)"
    )
    scale: float = Field(0.3, description="λ, the weight of the combined task vector")


def _drop(params: DareParams):
    return functools.partial(random_drop, p=params.p, seed=params.seed, rescale=params.rescale)


def prepare(sweep: Sweep, params: DareParams) -> list[float] | None:
    if params.combine != "ties":
        return None
    return trim_thresholds(sweep, params.density, params.center, transform=_drop(params))


def merge_tensor(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: DareParams,
    thresholds: list[float] | None,
) -> torch.Tensor:
    origin, task_vectors = origin_and_vectors(finetuned, base, params.center)
    dropped = _drop(params)(key, task_vectors)
    if params.combine == "ties":
        combined = elect_and_merge(magnitude_trim(dropped, thresholds), "mean")
    else:
        combined = sum_of(dropped)
    return origin + params.scale * combined


METHOD = MergeMethod(
    name="dare",
    summary="randomly drop task-vector entries and rescale, then task arithmetic or TIES",
    reference="Yu et al., Language Models are Super Mario (DARE), ICML 2024",
    params=DareParams,
    merge_tensor=merge_tensor,
    uses_base=uses_base,
    prepare=prepare,
)
