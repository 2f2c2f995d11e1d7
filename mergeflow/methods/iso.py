"""Iso-C and Iso-CTS: isotropic merging in the common (and task-specific) subspace.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025.

Iso-C flattens the spectrum of the summed task vectors of each selected matrix:

    Δ = Σ_t τ_t = U S Vᵀ,    Δ_iso = mean(S) · U Vᵀ,    θ = origin + α · Δ_iso

Iso-CTS keeps the top ``common_fraction`` of Δ's directions as the common subspace, gives
each task the top directions of its vector projected out of that subspace, concatenates
both, orthogonalizes, and scales every direction by the mean of their singular values.
Other tensors take the mean task vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergeflow.methods.base import MergeMethod
from mergeflow.methods.cart import AllMatrices
from mergeflow.methods.task_vectors import TaskVectorParams, merge_matrices, uses_base
from mergeflow.statedict import sum_of
from mergeflow.svd import orthogonalize


class IsoCParams(TaskVectorParams, AllMatrices):
    scale: float = Field(1.0, description="α, the weight of the isotropic task vector")


class IsoCtsParams(IsoCParams):
    common_fraction: float = Field(
        0.8, gt=0.0, le=1.0, description="share of directions in the common subspace"
    )


def isotropic_common(task_vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(sum_of(task_vectors), full_matrices=False)
    return s.mean() * (u @ vh)


def isotropic_common_and_specific(
    task_vectors: Sequence[torch.Tensor], common_fraction: float
) -> torch.Tensor:
    num_tasks = len(task_vectors)
    full = min(task_vectors[0].shape)
    common = int(full * common_fraction)
    per_task = round((full - common) / num_tasks)
    common = full - per_task * num_tasks
    u, s, vh = torch.linalg.svd(sum_of(task_vectors), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    for tau in task_vectors:
        specific = tau - us[0] @ (us[0].T @ tau)
        tu, ts, tvh = torch.linalg.svd(specific, full_matrices=False)
        us.append(tu[:, :per_task])
        ss.append(ts[:per_task])
        vhs.append(tvh[:per_task])
    mean_s = torch.cat(ss).mean()
    return mean_s * (orthogonalize(torch.cat(us, dim=1)) @ orthogonalize(torch.cat(vhs, dim=0)))


def merge_iso_c(key, finetuned, base, params: IsoCParams, context=None) -> torch.Tensor:
    return merge_matrices(key, finetuned, base, params, isotropic_common)


def merge_iso_cts(key, finetuned, base, params: IsoCtsParams, context=None) -> torch.Tensor:
    def rule(task_vectors):
        return isotropic_common_and_specific(task_vectors, params.common_fraction)

    return merge_matrices(key, finetuned, base, params, rule)


ISO_C = MergeMethod(
    name="iso_c",
    summary="summed task vectors with a flat (isotropic) spectrum",
    reference="Marczak et al., No Task Left Behind (Iso-C), ICML 2025",
    params=IsoCParams,
    merge_tensor=merge_iso_c,
    uses_base=uses_base,
)

ISO_CTS = MergeMethod(
    name="iso_cts",
    summary="isotropic merge of the common subspace plus each task's own directions",
    reference="Marczak et al., No Task Left Behind (Iso-CTS), ICML 2025",
    params=IsoCtsParams,
    merge_tensor=merge_iso_cts,
    uses_base=uses_base,
)

METHODS = (ISO_C, ISO_CTS)
