"""CART: centered arithmetic with a low-rank approximation of each centered task vector.

Choi et al., "Revisiting Weight Averaging for Model Merging" (2024).

    θ_avg = mean_t θ_t,    τ̄_t = θ_t − θ_avg
    θ     = θ_avg + λ · Σ_t SVD_k(τ̄_t)        for selected weight matrices
    θ     = θ_avg                              for every other tensor

with ``k = max(1, int(rank_ratio · min(m, n)))``, or, with ``energy`` set, k chosen per matrix
and task as the smallest rank holding that share of ‖τ̄_t‖²_F. The centered vectors of a non-selected
tensor sum to zero, so it ends at θ_avg; at full rank the selected ones do too, and CART is
weight averaging. The base checkpoint plays no part in the result.

To sweep many (rank_ratio, scale) points from one SVD per matrix and task, use
:class:`mergeflow.cart_grid.CartFactors`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from pydantic import Field, field_validator

from mergeflow.architectures import MATRIX_PATTERNS, is_table, matches
from mergeflow.kernels.cart import DEFAULT_RANK_RATIO, factorize_centered, kept_ranks
from mergeflow.methods.base import MergeMethod, MethodParams
from mergeflow.statedict import mean_of
from mergeflow.svd import low_rank_sum, rank_for


class LowRankSelection(MethodParams):
    """Which tensors get the low-rank treatment: 2-D tensors matching at least one
    ``include`` regex and no ``exclude`` regex (``re.search``; a comma-separated string is
    accepted from the command line). Without ``include``, the weight matrices of the
    checkpoint's architecture (:mod:`mergeflow.architectures`): for open_clip
    ``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``,
    ``mlp.c_proj.weight``; for Hugging Face models their attention and MLP projections."""

    include: tuple[str, ...] | None = Field(
        None,
        description="regexes a low-rank key matches (default: the architecture's attention "
        "and MLP weight matrices; see `mergeflow inspect`)",
    )
    exclude: tuple[str, ...] = Field((), description="regexes a low-rank key avoids")

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def split_comma_separated(cls, value):
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("include", "exclude")
    @classmethod
    def check_regexes(cls, patterns: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for pattern in patterns or ():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return patterns

    def by_default(self, key: str) -> bool:
        """What is selected without ``include``: the architectures' weight matrices."""
        return matches(key, MATRIX_PATTERNS)

    def selects(self, key: str, shape: Sequence[int]) -> bool:
        if len(shape) != 2 or matches(key, self.exclude):
            return False
        return self.by_default(key) if self.include is None else matches(key, self.include)

    def describe_rule(self) -> str:
        rule = (
            "include " + ",".join(self.include) if self.include else "the architecture's matrices"
        )
        return rule + (f", exclude {','.join(self.exclude)}" if self.exclude else "")


class AllMatrices(LowRankSelection):
    """Every 2-D tensor but vocabulary tables, as TSV and Iso-C/Iso-CTS treat them in their
    papers (their reference code takes every 2-D parameter of a vision tower)."""

    include: tuple[str, ...] | None = Field(
        None,
        description="regexes a low-rank key matches (default: every 2-D tensor but "
        "token embeddings and output heads)",
    )

    def by_default(self, key: str) -> bool:
        return not is_table(key)

    def describe_rule(self) -> str:
        return super().describe_rule().replace("the architecture's matrices", "every matrix")


class CartParams(LowRankSelection):
    rank_ratio: float = Field(
        DEFAULT_RANK_RATIO,
        gt=0.0,
        le=1.0,
        description="fraction of min(m, n) singular triplets kept",
    )
    scale: float = Field(1.0, description="λ, the weight of the summed low-rank vectors")
    energy: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="instead of rank_ratio: per matrix and task, the smallest rank whose "
        "singular values hold this share of the centered vector's squared norm",
    )


def merge_tensor(
    key: str,
    finetuned: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    params: CartParams,
    context=None,
) -> torch.Tensor:
    average = mean_of(finetuned)
    if not params.selects(key, average.shape):
        return average
    # the energy rule needs the whole spectrum, the rank rule only its top k
    full = min(average.shape)
    k = full if params.energy is not None else rank_for(average.shape, params.rank_ratio)
    parts = factorize_centered(finetuned, k, average)
    ranks = kept_ranks(parts.factors, parts.norms2, params.rank_ratio, params.energy)
    return average.add_(low_rank_sum(parts.factors, ranks), alpha=params.scale)


METHOD = MergeMethod(
    name="cart",
    summary="weight average plus scale times the rank-k parts of the centered task vectors",
    reference="Choi et al., Revisiting Weight Averaging for Model Merging, 2024",
    params=CartParams,
    merge_tensor=merge_tensor,
    uses_base=False,
)
