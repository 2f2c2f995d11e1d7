"""OPCM's properties as its paper states them, on a tiny real open_clip tower.

Agreement with fusion_bench's own OPCM is in ``test_fusion_bench_agreement.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import finetune_like, tiny_tower_state

from mergeflow.checkpoints import StateDictReader
from mergeflow.merge import merge_readers
from mergeflow.methods.opcm import project_out, split_rank
from mergeflow.storage import default_cache_dir


@pytest.fixture(scope="module")
def stream():
    base = tiny_tower_state(seed=21, width=32, layers=2)
    return base, finetune_like(base, num_tasks=4, seed=22)


def opcm(base, finetuned, **params):
    readers = [StateDictReader(s, f"task{i}") for i, s in enumerate(finetuned)]
    return merge_readers("opcm", readers, StateDictReader(base, "base"), params, device="cpu")


def norm_of(state, base):
    return math.sqrt(sum(float((state[k] - base[k]).double().square().sum()) for k in base))


def test_the_first_model_alone_is_the_merge(stream):
    base, finetuned = stream
    merged = opcm(base, finetuned[:1])
    for key in base:
        torch.testing.assert_close(merged[key], finetuned[0][key], msg=key)


def test_the_merged_vector_has_the_tasks_mean_norm(stream):
    base, finetuned = stream
    merged = opcm(base, finetuned, alpha=0.3)
    mean_norm = sum(norm_of(f, base) for f in finetuned) / len(finetuned)
    assert norm_of(merged, base) == pytest.approx(mean_norm, rel=1e-5)
    assert norm_of(merged, base) < norm_of({k: sum(f[k] for f in finetuned) for k in base}, base)


def test_a_new_vector_loses_its_part_in_the_protected_directions():
    gen = torch.Generator().manual_seed(0)
    running = torch.randn(24, 16, generator=gen) @ torch.diag(torch.linspace(3, 0.1, 16))
    tau = torch.randn(24, 16, generator=gen)
    u, s, vh = torch.linalg.svd(running, full_matrices=True)  # a basis of all 24 × 16
    r = split_rank(s, 0.5)
    share = s.cumsum(0) / s.sum()  # r: the first index whose cumulative share exceeds α
    assert 0 < r < 16 and float(share[r]) > 0.5 >= float(share[r - 1])
    for zero_diagonal in (True, False):
        cleaned = project_out(running, tau, 0.5, zero_diagonal)
        inside = u.T @ cleaned @ vh.T
        assert inside[:r, :r].abs().max() < 1e-5  # the protected block is gone
        assert inside.shape == (24, 16)
        diagonal = inside.diagonal()[r:]
        original = (u.T @ tau @ vh.T).diagonal()[r:]
        if zero_diagonal:
            assert diagonal.abs().max() < 1e-5
        else:
            torch.testing.assert_close(diagonal, original, atol=1e-5, rtol=0)
        # what lies outside the block and the diagonal is kept as it was
        mask = torch.ones(24, 16, dtype=torch.bool)
        mask[:r, :r] = False
        mask[range(r, 16), range(r, 16)] = not zero_diagonal
        torch.testing.assert_close(inside[mask], (u.T @ tau @ vh.T)[mask], atol=1e-5, rtol=0)


def test_directions_the_merge_has_not_used_are_not_zeroed():
    """A rank-2 running merge has arbitrary singular vectors for σ = 0: the new vector's
    part there is kept whole, not made to depend on the SVD routine."""
    gen = torch.Generator().manual_seed(1)
    running = torch.randn(12, 2, generator=gen) @ torch.randn(2, 10, generator=gen)
    tau = torch.randn(12, 10, generator=gen)
    u, s, vh = torch.linalg.svd(running, full_matrices=False)
    cleaned = project_out(running, tau, 0.99, zero_diagonal=True)
    null_left, null_right = u[:, 2:], vh[2:]
    torch.testing.assert_close(
        null_left.T @ cleaned @ null_right.T, null_left.T @ tau @ null_right.T, atol=1e-5, rtol=0
    )


def test_open_clip_in_proj_is_projected_as_its_three_maps(stream):
    base, finetuned = stream
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    merged = opcm(base, finetuned[:2], alpha=0.5, zero_diagonal=False)
    # R = τ_1 + τ̃_2, and each q/k/v block of τ̃_2 misses that block's protected directions
    tau_1 = finetuned[0][key] - base[key]
    scale = None
    for first, out in zip(tau_1.chunk(3), (merged[key] - base[key]).chunk(3), strict=True):
        u, s, vh = torch.linalg.svd(first, full_matrices=False)
        r = split_rank(s, 0.5)
        if scale is None:  # the global rescale, read off the first block's protected part
            scale = float((u[:, :r].T @ out @ vh[:r].T).norm() / s[:r].norm())
        cleaned = out / scale - first
        assert (u[:, :r].T @ cleaned @ vh[:r].T).abs().max() < 1e-4
    whole = torch.linalg.svd(tau_1, full_matrices=False)
    r = split_rank(whole.S, 0.5)
    cleaned = (merged[key] - base[key]) / scale - tau_1
    assert (whole.U[:, :r].T @ cleaned @ whole.Vh[:r].T).abs().max() > 1e-3  # not one matrix


def test_the_order_of_arrival_matters_and_is_kept(stream):
    base, finetuned = stream
    forward = opcm(base, finetuned)
    again = opcm(base, finetuned)
    backward = opcm(base, finetuned[::-1])
    key = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    assert torch.equal(forward[key], again[key])
    assert not torch.allclose(forward[key], backward[key], atol=1e-4)


def test_the_spill_is_removed_after_the_merge(stream):
    base, finetuned = stream
    opcm(base, finetuned)
    assert list((default_cache_dir() / "tmp").glob("spill-*")) == []
