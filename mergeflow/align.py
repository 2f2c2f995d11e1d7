"""Weight matching: permute a model onto a reference before merging, for checkpoints that did
not start from one base (Ainsworth et al., Git Re-Basin, ICLR 2023; the transformer
groups after Ito et al., ICLR 2025).

A permutation of a layer's hidden units, applied to the weights that write them and the
weights that read them, leaves the network's function unchanged; two models trained from
different initializations can differ by such permutations, and merging them unaligned
averages unrelated units. For an open_clip image tower (``visual.``, or no prefix) the
permutations that keep its function are:

- **the residual stream** (width D), one for the whole tower, as the skip connections tie
  every block together: conv1's outputs, the class and positional embeddings, every
  LayerNorm, each block's attention input columns, output projection rows and bias, MLP
  input columns and output rows and bias, and the rows of ``proj`` (its columns, the
  embedding shared with the text tower and the heads, stay);
- **each block's MLP hidden units** (4D): c_fc's rows and bias, c_proj's columns;
- **each block's attention**, by head: one head order for q, k, v and the output
  projection's column blocks, and within each head one permutation shared by q's and k's
  rows (qᵀk must not change) and one by v's rows and bias and the output projection's
  columns. A permutation of q and k rows that ignores head boundaries changes the function
  (tested).

Matching is coordinate descent over the groups (Git Re-Basin's weight matching): each
group in turn, with the others held, is the linear assignment that maximizes Σ ⟨W_ref, W⟩
over every weight it acts on (``scipy.optimize.linear_sum_assignment``); the attention
group solves, for every pair of heads, the two within-head assignments, then the head
order by their summed scores. It stops when a sweep gains nothing. Matching needs no data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from mergeflow.errors import ParameterError

StateDict = dict[str, torch.Tensor]


@dataclass
class VitPermutation:
    """The permutations of one tower: residual (D), per block MLP (4D) and attention (head
    order H, within-head q/k and v/o, each H × d_head)."""

    residual: torch.Tensor
    mlp: list[torch.Tensor]
    heads: list[torch.Tensor]
    qk: list[torch.Tensor]  # (H, d_head): the order within head h, after the head order
    vo: list[torch.Tensor]

    @staticmethod
    def identity(width: int, hidden: int, blocks: int, heads: int) -> VitPermutation:
        d_head = width // heads
        inner = torch.arange(d_head).repeat(heads, 1)
        return VitPermutation(
            torch.arange(width),
            [torch.arange(hidden) for _ in range(blocks)],
            [torch.arange(heads) for _ in range(blocks)],
            [inner.clone() for _ in range(blocks)],
            [inner.clone() for _ in range(blocks)],
        )

    @staticmethod
    def random(layout: VitLayout, seed: int) -> VitPermutation:
        """A random permutation of every group of ``layout``'s tower (seeded): what a model
        fine-tuned from a permuted copy of its base would differ by."""
        gen = torch.Generator().manual_seed(seed)
        d_head = layout.width // layout.heads

        def inner():
            return torch.stack([torch.randperm(d_head, generator=gen) for _ in range(layout.heads)])

        blocks = range(layout.blocks)
        return VitPermutation(
            torch.randperm(layout.width, generator=gen),
            [torch.randperm(layout.hidden, generator=gen) for _ in blocks],
            [torch.randperm(layout.heads, generator=gen) for _ in blocks],
            [inner() for _ in blocks],
            [inner() for _ in blocks],
        )

    def attention_rows(self, block: int, which: str) -> torch.Tensor:
        """The D-row permutation of q/k (``qk``) or v (``vo``) in block ``block``: new row
        h·d + i takes old row heads[h]·d + inner[h, i]."""
        inner = (self.qk if which == "qk" else self.vo)[block]
        d_head = inner.shape[1]
        return (self.heads[block][:, None] * d_head + inner).reshape(-1)


@dataclass(frozen=True)
class VitLayout:
    """Where an open_clip image tower's tensors are: the key prefix, width, blocks, heads."""

    prefix: str
    width: int
    hidden: int
    blocks: int
    heads: int
    keys: dict[str, str] = field(default_factory=dict)

    def block(self, i: int, name: str) -> str:
        return f"{self.prefix}transformer.resblocks.{i}.{name}"


def vit_layout(state: Mapping[str, torch.Tensor], heads: int) -> VitLayout:
    """The tower in ``state`` (``visual.``-prefixed or bare); refused unless it is one."""
    prefix = "visual." if "visual.conv1.weight" in state else ""
    if f"{prefix}conv1.weight" not in state:
        raise ParameterError("weight matching reads open_clip image towers: no conv1.weight")
    width = state[f"{prefix}conv1.weight"].shape[0]
    found = {
        int(m[1])
        for k in state
        if (m := re.match(rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.", k))
    }
    blocks = max(found) + 1 if found else 0
    if width % heads:
        raise ParameterError(f"width {width} does not split into {heads} heads")
    hidden = state[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    known = {"attn_pool", "text_projection", "token_embedding"}
    odd = [k for k in state if k.startswith(prefix) and any(n in k for n in known)]
    if odd:
        raise ParameterError(f"{odd[0]}: weight matching covers plain ViT towers only")
    return VitLayout(prefix, width, hidden, blocks, heads)


def permute(state: Mapping[str, torch.Tensor], perm: VitPermutation, layout: VitLayout):
    """``state`` with ``perm`` applied: the same function, other unit order."""
    out = {k: v.clone() for k, v in state.items()}
    p, r = layout.prefix, perm.residual

    def rows(key, index):
        out[key] = out[key].index_select(0, index)

    def cols(key, index):
        out[key] = out[key].index_select(1, index)

    rows(f"{p}conv1.weight", r)
    rows(f"{p}class_embedding", r)
    cols(f"{p}positional_embedding", r)
    for name in ("ln_pre", "ln_post"):
        rows(f"{p}{name}.weight", r)
        rows(f"{p}{name}.bias", r)
    rows(f"{p}proj", r)
    d = layout.width
    for i in range(layout.blocks):
        for name in ("ln_1", "ln_2"):
            rows(layout.block(i, f"{name}.weight"), r)
            rows(layout.block(i, f"{name}.bias"), r)
        qk, vo = perm.attention_rows(i, "qk"), perm.attention_rows(i, "vo")
        qkv_rows = torch.cat([qk, qk + d, vo + 2 * d])
        rows(layout.block(i, "attn.in_proj_weight"), qkv_rows)
        cols(layout.block(i, "attn.in_proj_weight"), r)
        rows(layout.block(i, "attn.in_proj_bias"), qkv_rows)
        cols(layout.block(i, "attn.out_proj.weight"), vo)
        rows(layout.block(i, "attn.out_proj.weight"), r)
        rows(layout.block(i, "attn.out_proj.bias"), r)
        m = perm.mlp[i]
        rows(layout.block(i, "mlp.c_fc.weight"), m)
        rows(layout.block(i, "mlp.c_fc.bias"), m)
        cols(layout.block(i, "mlp.c_fc.weight"), r)
        cols(layout.block(i, "mlp.c_proj.weight"), m)
        rows(layout.block(i, "mlp.c_proj.weight"), r)
        rows(layout.block(i, "mlp.c_proj.bias"), r)
    return out


def _assign(score: torch.Tensor) -> torch.Tensor:
    """The permutation p maximizing Σ_i score[i, p[i]] (score: ref units × model units)."""
    from scipy.optimize import linear_sum_assignment

    _, columns = linear_sum_assignment(score.double().numpy(), maximize=True)
    return torch.as_tensor(columns, dtype=torch.long)


def _units(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """``tensor`` with ``axis`` first and the rest flattened: one row per unit."""
    return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1).double()


def _residual_score(ref, model, layout: VitLayout) -> torch.Tensor:
    """Σ over every weight the residual permutation acts on of ⟨ref unit i, model unit j⟩
    (``model`` with every other group's permutation applied)."""
    p = layout.prefix
    pairs = [(f"{p}conv1.weight", 0), (f"{p}class_embedding", 0), (f"{p}positional_embedding", 1),
             (f"{p}proj", 0)]  # fmt: skip
    for name in ("ln_pre", "ln_post"):
        pairs += [(f"{p}{name}.weight", 0), (f"{p}{name}.bias", 0)]
    for i in range(layout.blocks):
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.out_proj.bias",
                     "mlp.c_proj.bias"):  # fmt: skip
            pairs.append((layout.block(i, name), 0))
        pairs += [(layout.block(i, "attn.in_proj_weight"), 1),
                  (layout.block(i, "attn.out_proj.weight"), 0),
                  (layout.block(i, "mlp.c_fc.weight"), 1),
                  (layout.block(i, "mlp.c_proj.weight"), 0)]  # fmt: skip
    return sum(_units(ref[k], a) @ _units(model[k], a).T for k, a in pairs)


def _mlp_score(ref, model, layout: VitLayout, i: int) -> torch.Tensor:
    pairs = [("mlp.c_fc.weight", 0), ("mlp.c_fc.bias", 0), ("mlp.c_proj.weight", 1)]
    return sum(
        _units(ref[layout.block(i, k)], a) @ _units(model[layout.block(i, k)], a).T
        for k, a in pairs
    )


def _attention(ref, model, layout: VitLayout, i: int):
    """(head order, q/k order, v/o order) of block ``i`` maximizing the match: for every
    (reference head, model head) the two within-head assignments, then the heads by their
    summed scores."""
    d, h = layout.width, layout.heads
    dh = d // h
    keys = [layout.block(i, n) for n in ("attn.in_proj_weight", "attn.in_proj_bias",
                                          "attn.out_proj.weight")]  # fmt: skip
    w_ref, b_ref, o_ref = (ref[k] for k in keys)
    w, b, o = (model[k] for k in keys)

    def head_units(weight, bias, out, head):
        rows = slice(head * dh, (head + 1) * dh)
        q = weight[rows].double()
        k = weight[d:][rows].double()
        v = torch.cat([weight[2 * d :][rows], bias[2 * d :][rows, None], out[:, rows].T], dim=1)
        qk = torch.cat([q, k, bias[:d][rows, None], bias[d : 2 * d][rows, None]], dim=1)
        return qk.double(), v.double()

    scores = torch.zeros(h, h, dtype=torch.float64)
    inner_qk = torch.zeros(h, h, dh, dtype=torch.long)
    inner_vo = torch.zeros(h, h, dh, dtype=torch.long)
    units_ref = [head_units(w_ref, b_ref, o_ref, a) for a in range(h)]
    units = [head_units(w, b, o, g) for g in range(h)]
    for a in range(h):
        for g in range(h):
            total = 0.0
            for part, store in ((0, inner_qk), (1, inner_vo)):
                score = units_ref[a][part] @ units[g][part].T
                order = _assign(score)
                store[a, g] = order
                total += float(score[torch.arange(dh), order].sum())
            scores[a, g] = total
    head_order = _assign(scores)
    qk = torch.stack([inner_qk[a, head_order[a]] for a in range(h)])
    vo = torch.stack([inner_vo[a, head_order[a]] for a in range(h)])
    return head_order, qk, vo


def match_weights(
    reference: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    heads: int,
    max_sweeps: int = 100,
) -> tuple[StateDict, VitPermutation]:
    """``model`` permuted onto ``reference`` (both open_clip image towers of one
    architecture, ``heads`` attention heads), and the permutation found."""
    layout = vit_layout(reference, heads)
    other = vit_layout(model, heads)
    if (other.width, other.hidden, other.blocks) != (layout.width, layout.hidden, layout.blocks):
        raise ParameterError("the two towers have other widths or depths: nothing to match")
    perm = VitPermutation.identity(layout.width, layout.hidden, layout.blocks, heads)
    best = -np.inf
    for _ in range(max_sweeps):
        # each assignment is found on the model as permuted so far, then composed
        order = _assign(_residual_score(reference, permute(model, perm, layout), layout))
        perm.residual = perm.residual[order]
        for i in range(layout.blocks):
            current = permute(model, perm, layout)
            order = _assign(_mlp_score(reference, current, layout, i))
            perm.mlp[i] = perm.mlp[i][order]
            current = permute(model, perm, layout)
            head_order, qk, vo = _attention(reference, current, layout, i)
            _compose_attention(perm, i, head_order, qk, vo)
        aligned = permute(model, perm, layout)
        total = sum(float((reference[k].double() * aligned[k].double()).sum()) for k in reference)
        if total <= best + 1e-12 * abs(best):
            break
        best = total
    return permute(model, perm, layout), perm


def _compose_attention(perm: VitPermutation, i: int, head_order, qk, vo) -> None:
    """Compose a block's new attention permutation (found on the already-permuted model)
    with the one it held."""
    old_heads, old_qk, old_vo = perm.heads[i], perm.qk[i], perm.vo[i]
    perm.heads[i] = old_heads[head_order]
    perm.qk[i] = torch.stack([old_qk[head_order[a]][qk[a]] for a in range(len(head_order))])
    perm.vo[i] = torch.stack([old_vo[head_order[a]][vo[a]] for a in range(len(head_order))])
