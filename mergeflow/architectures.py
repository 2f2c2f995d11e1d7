"""Architectures as data: which tensors of a checkpoint are weight matrices.

Low-rank methods (CART, TSV-M, Iso-C/CTS) treat the linear layers of attention and MLP blocks
as matrices and every other tensor element-wise. Which keys those are depends on the family's
naming, so each family is a small description: how to recognise it from key names, the
regexes of its linear weight matrices, and its vocabulary tables (2-D, but lookup tables,
not maps). The default selection of every method is the union of the families' matrix
patterns: each is specific to its family's names, so on any one checkpoint it selects that
family's matrices; ``include``/``exclude`` override it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One architecture family's naming."""

    name: str
    detect: str
    """regex a key of this family matches (``re.search``)"""
    matrices: tuple[str, ...]
    """regexes of its linear weight matrices (attention projections, MLP layers)"""
    tables: tuple[str, ...] = ()
    """regexes of its vocabulary tables (token embeddings, tied output heads)"""
    stacked: tuple[tuple[str, int], ...] = ()
    """(regex, n) of matrices that are n linear maps stacked by rows (open_clip packs q, k
    and v into one ``in_proj_weight``), for methods that treat each map on its own"""

    def is_matrix(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.matrices)


FAMILIES: tuple[Family, ...] = (
    Family(
        "open_clip ViT/CLIP",
        r"(^|\.)resblocks\.\d+\.attn\.in_proj_weight$",
        (
            r"(^|\.)resblocks\.\d+\.attn\.(in_proj_weight|out_proj\.weight)$",
            r"(^|\.)resblocks\.\d+\.mlp\.(c_fc|c_proj)\.weight$",
        ),
        (r"(^|\.)token_embedding\.weight$",),
        ((r"(^|\.)resblocks\.\d+\.attn\.in_proj_weight$", 3),),
    ),
    Family(
        "Hugging Face CLIP",
        r"(^|\.)(vision_model|text_model)\.encoder\.layers\.\d+\.self_attn\.",
        (
            r"(^|\.)encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.weight$",
            r"(^|\.)encoder\.layers\.\d+\.mlp\.fc[12]\.weight$",
        ),
        (r"(^|\.)token_embedding\.weight$",),
    ),
    Family(
        "Hugging Face ViT (transformers 5 names)",
        r"(^|\.)layers\.\d+\.attention\.[qkvo]_proj\.weight$",
        (
            r"(^|\.)layers\.\d+\.attention\.[qkvo]_proj\.weight$",
            r"(^|\.)layers\.\d+\.mlp\.fc[12]\.weight$",
        ),
    ),
    Family(
        "Hugging Face ViT / BERT / RoBERTa",
        r"(^|\.)layer\.\d+\.attention\.(self|attention)\.(query|key|value)\.weight$",
        (
            r"(^|\.)layer\.\d+\.attention\.(self|attention)\.(query|key|value)\.weight$",
            r"(^|\.)layer\.\d+\.attention\.output\.dense\.weight$",
            r"(^|\.)layer\.\d+\.(intermediate|output)\.dense\.weight$",
        ),
        (r"(^|\.)(word|token_type)_embeddings\.weight$",),
    ),
    Family(
        "T5",
        r"(^|\.)block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.q\.weight$",
        (
            r"(^|\.)block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.[qkvo]\.weight$",
            r"(^|\.)block\.\d+\.layer\.\d+\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$",
        ),
        (r"(^|\.)shared\.weight$", r"(^|\.)embed_tokens\.weight$", r"(^|\.)lm_head\.weight$"),
    ),
    Family(
        "Llama / Mistral / Qwen decoder",
        r"(^|\.)layers\.\d+\.mlp\.(gate|up|down)_proj\.weight$",
        (
            r"(^|\.)layers\.\d+\.self_attn\.[qkvo]_proj\.weight$",
            r"(^|\.)layers\.\d+\.mlp\.(gate|up|down)_proj\.weight$",
        ),
        (r"(^|\.)embed_tokens\.weight$", r"(^|\.)lm_head\.weight$"),
    ),
)

MATRIX_PATTERNS: tuple[str, ...] = tuple(p for f in FAMILIES for p in f.matrices)
TABLE_PATTERNS: tuple[str, ...] = tuple(dict.fromkeys(p for f in FAMILIES for p in f.tables))


def detect_families(keys: Iterable[str]) -> list[Family]:
    """The families whose naming the keys follow (usually one; a CLIP has one per tower
    naming, so at most one here), in :data:`FAMILIES` order."""
    keys = list(keys)
    return [f for f in FAMILIES if any(re.search(f.detect, k) for k in keys)]


def describe(keys: Iterable[str]) -> str:
    """The detected family names, or ``unrecognised``."""
    found = detect_families(keys)
    return " + ".join(f.name for f in found) if found else "unrecognised"


# the containers transformer blocks are numbered in: open_clip's resblocks, transformers'
# layers / layer / block / h (GPT-2), timm's blocks
LAYER = re.compile(
    r"^(?P<stack>(?:.*?\.)?(?:resblocks|layers|layer|block|blocks|h))\.(?P<index>\d+)\."
)


def layer_of(key: str) -> tuple[str, int] | None:
    """(the stack, the layer index) of a key inside a numbered transformer block, e.g.
    ``('model.layers', 3)`` for ``model.layers.3.mlp.up_proj.weight``; None for the
    others (embeddings, final norms, heads)."""
    match = LAYER.match(key)
    return (match["stack"], int(match["index"])) if match else None


def stacked_maps(key: str, shape: Sequence[int]) -> int:
    """How many linear maps the matrix ``key`` stacks by rows (1 but for packed ones such
    as open_clip's ``attn.in_proj_weight``, whose rows are q, k, v)."""
    for family in FAMILIES:
        for pattern, count in family.stacked:
            if re.search(pattern, key) and len(shape) == 2 and shape[0] % count == 0:
                return count
    return 1


def is_table(key: str) -> bool:
    return any(re.search(p, key) for p in TABLE_PATTERNS)


def matches(key: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, key) for p in patterns)
