import pytest
import torch
from conftest import finetune_like, tiny_tower_state

from mergeflow import ParameterError
from mergeflow.cart_grid import CartFactors
from mergeflow.checkpoints import StateDictReader
from mergeflow.merge import merge_readers
from mergeflow.methods.cart import CartParams, LowRankSelection
from mergeflow.statedict import mean
from mergeflow.svd import rank_for

OPEN_CLIP_LOW_RANK = {
    "attn.in_proj_weight",
    "attn.out_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
}


def readers(states):
    return [StateDictReader(s, f"task{i}") for i, s in enumerate(states)]


def cart(states, **params):
    return merge_readers("cart", readers(states), params=params, device="cpu")


def assert_same_merge(got, expected):
    """Equal merges up to float32 SVD's resolution, per tensor. A grid factorized to a high
    rank gets LAPACK's float32 SVD and a direct merge at a low rank the float64 Gram route
    (svd.truncated_svd); where two singular values nearly tie at the cut they differ by
    what float32 SVD resolves (measured 4e-6 relative here)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        error = (got[key].double() - value.double()).norm()
        assert error <= 1e-5 * value.double().norm(), key


def reference_cart(states, rank_ratio, scale, selected):
    """CART written out from the paper with an independent SVD per task vector."""
    out = {}
    for key in states[0]:
        stacked = torch.stack([s[key].double() for s in states])
        avg = stacked.mean(0)
        if key in selected:
            k = max(1, int(rank_ratio * min(avg.shape)))
            update = torch.zeros_like(avg)
            for tau in stacked - avg:
                u, s, vh = torch.linalg.svd(tau)
                update += u[:, :k] @ torch.diag(s[:k]) @ vh[:k, :]
            avg = avg + scale * update
        out[key] = avg
    return out


def test_default_selection_is_open_clips_attention_and_mlp_matrices(tower):
    selection = LowRankSelection()
    chosen = {key for key, t in tower.items() if selection.selects(key, t.shape)}
    suffixes = {key.split(".", 4)[-1] for key in chosen}
    assert suffixes == OPEN_CLIP_LOW_RANK
    assert len(chosen) == 4 * 2  # four matrices in each of two blocks
    assert "visual.proj" not in chosen and "visual.conv1.weight" not in chosen


def test_selection_patterns_are_configurable(tower):
    only_mlp = LowRankSelection(include="mlp.c_fc", exclude=())
    chosen = {key for key, t in tower.items() if only_mlp.selects(key, t.shape)}
    assert chosen == {f"visual.transformer.resblocks.{i}.mlp.c_fc.weight" for i in range(2)}
    with pytest.raises(ParameterError, match="include"):
        merge_readers("cart", readers([tower, tower]), params={"include": "("})


def test_full_rank_cart_equals_weight_averaging(family):
    _, tuned = family
    merged = cart(tuned, rank_ratio=1.0, scale=1.0)
    averaged = mean(tuned)
    for key in averaged:
        torch.testing.assert_close(merged[key], averaged[key], rtol=1e-5, atol=1e-6)


def test_centered_vectors_of_non_matrix_tensors_sum_to_zero(family):
    _, tuned = family
    avg = mean(tuned)
    selection = LowRankSelection()
    others = [k for k, t in avg.items() if not selection.selects(k, t.shape)]
    assert others
    for key in others:
        centered_sum = sum(t[key].double() - avg[key].double() for t in tuned)
        assert centered_sum.abs().max().item() < 1e-6
    merged = cart(tuned, rank_ratio=0.25, scale=1.7)
    for key in others:
        torch.testing.assert_close(merged[key], avg[key])


@pytest.mark.parametrize("rank_ratio,scale", [(0.1, 1.0), (0.25, 0.6), (0.5, 2.0), (0.25, -0.5)])
def test_low_rank_truncation_matches_a_direct_svd(family, rank_ratio, scale):
    _, tuned = family
    selection = LowRankSelection()
    selected = {k for k, t in tuned[0].items() if selection.selects(k, t.shape)}
    expected = reference_cart(tuned, rank_ratio, scale, selected)
    merged = cart(tuned, rank_ratio=rank_ratio, scale=scale)
    for key in selected:
        torch.testing.assert_close(merged[key].double(), expected[key], rtol=1e-4, atol=1e-5)
    # the truncation is real: low rank differs from averaging on the selected matrices
    avg = mean(tuned)
    assert any(not torch.allclose(merged[k], avg[k], atol=1e-4) for k in selected)
    # and λ weighs the low-rank sum linearly, sign included
    unit = cart(tuned, rank_ratio=rank_ratio, scale=1.0)
    for key in selected:
        torch.testing.assert_close(
            merged[key] - avg[key], scale * (unit[key] - avg[key]), rtol=1e-4, atol=1e-6
        )


def test_rank_formula():
    assert rank_for((96, 32), 0.1) == 3
    assert rank_for((96, 32), 0.01) == 1
    assert rank_for((768, 3072), 0.12) == int(0.12 * 768)
    assert rank_for((64, 64), 1.0) == 64


def test_grid_point_equals_a_direct_merge(family):
    _, tuned = family
    factors = CartFactors.factorize(tuned, max_rank_ratio=0.5, device="cpu")
    for rank_ratio, scale in [(0.5, 1.0), (0.25, 0.3), (0.1, 1.5)]:
        from_grid = factors.merge(rank_ratio, scale, device="cpu")
        direct = cart(tuned, rank_ratio=rank_ratio, scale=scale)
        assert_same_merge(from_grid, direct)


def test_grid_reuses_the_update_across_scales_and_adds_only_new_ranks(family, monkeypatch):
    """Scales at one rank reuse its update; a higher rank multiplies only the components
    between the two; a lower rank or energy starts afresh. Every point equals a direct
    merge."""
    import mergeflow.cart_grid as cart_grid

    _, tuned = family
    factors = CartFactors.factorize(tuned, max_rank_ratio=0.5, device="cpu")
    components = []
    low_rank_sum = cart_grid.low_rank_sum

    def counting(parts, k, start=0):
        starts = [start] * len(parts) if isinstance(start, int) else start
        ks = [k] * len(parts) if isinstance(k, int) else k
        components.append(sum(b - a for a, b in zip(starts, ks, strict=True)))
        return low_rank_sum(parts, k, start)

    monkeypatch.setattr(cart_grid, "low_rank_sum", counting)
    matrices = len(factors.factors)
    points = [(0.1, 0.5), (0.1, 1.5), (0.25, 1.0), (0.25, 0.3), (0.5, 1.0)]
    for rank_ratio, scale in points:
        assert_same_merge(
            factors.merge(rank_ratio, scale, device="cpu"),
            cart(tuned, rank_ratio=rank_ratio, scale=scale),
        )
    largest = sum(rank_for(factors.average[key].shape, 0.5) for key in factors.factors)
    assert sum(components) == len(tuned) * largest  # one reconstruction at the top rank
    assert len(components) == 3 * matrices  # a call per matrix and rank, none per scale
    components.clear()
    assert_same_merge(factors.merge(0.1, 2.0, device="cpu"), cart(tuned, rank_ratio=0.1, scale=2.0))
    assert len(components) == matrices


def test_grid_does_not_run_another_svd(family, monkeypatch):
    _, tuned = family
    factors = CartFactors.factorize(tuned, max_rank_ratio=0.5, device="cpu")

    def no_svd(*args, **kwargs):
        raise AssertionError("the grid ran an SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    merged = factors.merge(0.25, 1.0, device="cpu")
    assert len(merged) == len(tuned[0])


def test_grid_refuses_ranks_it_did_not_factorize(family):
    _, tuned = family
    factors = CartFactors.factorize(tuned, max_rank_ratio=0.25, device="cpu")
    with pytest.raises(ParameterError) as above:
        factors.merge(0.5)
    assert str(above.value) == (
        "rank_ratio 0.5 is above the factorized maximum 0.25; factorize with a larger "
        "max_rank_ratio"
    )
    with pytest.raises(ParameterError, match="rank_ratio"):
        factors.merge(0.0)
    with pytest.raises(ParameterError, match=r"parameter 'energy': .* less than or equal to 1"):
        factors.merge(energy=1.5)
    with pytest.raises(ParameterError, match=r"parameter 'rank_ratio': .* less than or equal to 1"):
        CartFactors.factorize(tuned, max_rank_ratio=1.5)


def test_grid_defaults_are_full_factorization_and_cart_s_own_point(family):
    _, tuned = family
    factors = CartFactors.factorize(tuned)  # every rank, on CUDA when there is one
    assert factors.max_rank_ratio == 1.0
    averaged = mean(tuned)
    for key, value in factors.merge(1.0, device="cpu").items():
        torch.testing.assert_close(value, averaged[key], atol=2e-5, rtol=0, msg=key)
    assert_same_merge(factors.merge(), cart(tuned))  # CART's own defaults: rank 0.12, λ 1
    assert factors.params(0.1).scale == 1.0
    assert_same_merge(factors.merge(0.2, 1.7, device="cpu"), cart(tuned, rank_ratio=0.2, scale=1.7))


def test_grid_names_the_fine_tuned_model_at_fault():
    good = tiny_tower_state(seed=1)
    bad = {k: v for k, v in good.items() if k != "visual.proj"}
    with pytest.raises(Exception, match="fine-tuned model 0.*missing from fine-tuned model 1"):
        CartFactors.factorize([good, bad], device="cpu")
    with pytest.raises(ParameterError, match="^no fine-tuned checkpoints given$"):
        CartFactors.factorize([], device="cpu")


def test_grid_energy_may_use_every_factorized_triplet(family):
    _, tuned = family
    factors = CartFactors.factorize(tuned, max_rank_ratio=0.25, device="cpu")
    # the smallest share the k_max triplets hold over all matrices and tasks: at that energy
    # some matrix needs all of them, which is allowed; more than they hold is refused
    held = min(
        float((f.s.double() ** 2).sum() / total)
        for key in factors.factors
        for f, total in zip(factors.factors[key], factors.norms[key].tolist(), strict=True)
    )
    ranks = {key: factors.energy_ranks(key, held * (1 - 1e-9)) for key in factors.factors}
    full = [
        k == f.rank for key in ranks for k, f in zip(ranks[key], factors.factors[key], strict=True)
    ]
    assert any(full)
    factors.merge(energy=held * (1 - 1e-9), device="cpu")
    with pytest.raises(
        ParameterError,
        match=r"^energy .* at '.*' needs more than the \d+ factorized singular triplets; "
        r"factorize with a larger max_rank_ratio$",
    ):
        factors.merge(energy=min(1.0, held * 1.01), device="cpu")


def test_grid_keeps_integer_buffers_as_the_first_model_holds_them(family, capsys):
    _, tuned = family
    # the buffer first, and each model's its own: it comes from the first, never averaged
    with_buffer = [{"visual.position_ids": torch.arange(5) + t, **m} for t, m in enumerate(tuned)]
    factors = CartFactors.factorize(with_buffer, max_rank_ratio=0.25, device="cpu")
    assert set(factors.factors) == set(CartFactors.factorize(tuned, 0.25, device="cpu").factors)
    for merged in (factors.merge(0.1, device="cpu"), factors.merge(energy=0.3, device="cpu")):
        assert torch.equal(merged["visual.position_ids"], torch.arange(5))
    assert capsys.readouterr().err == ""  # no progress bar unless asked for


def test_factors_round_trip_through_a_file(family, tmp_path):
    _, tuned = family
    factors = CartFactors.factorize(tuned, max_rank_ratio=0.3, device="cpu")
    path = tmp_path / "factors.safetensors"
    factors.save(path)
    loaded = CartFactors.load(path)
    assert loaded.num_tasks == len(tuned) and loaded.max_rank_ratio == 0.3
    a, b = factors.merge(0.2, 0.8, device="cpu"), loaded.merge(0.2, 0.8, device="cpu")
    for key in a:
        assert torch.equal(a[key], b[key])
    a, b = factors.merge(energy=0.5, device="cpu"), loaded.merge(energy=0.5, device="cpu")
    for key in a:
        assert torch.equal(a[key], b[key])
    other = tmp_path / "plain.safetensors"
    from mergeflow.checkpoints import save_state_dict

    save_state_dict(tuned[0], other)
    with pytest.raises(Exception, match=r"plain\.safetensors: not a CART factors file"):
        CartFactors.load(other)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_round_trip(dtype):
    base = {k: v.to(dtype) for k, v in tiny_tower_state(seed=3).items()}
    tuned = finetune_like(base, num_tasks=3, seed=4)
    assert all(t.dtype == dtype for t in tuned[0].values())
    merged = cart(tuned, rank_ratio=0.25, scale=1.0)
    assert all(merged[k].dtype == dtype for k in merged)
    # fp32 compute: the result equals the fp32 computation rounded once to the dtype
    selection = LowRankSelection()
    selected = {k for k, t in tuned[0].items() if selection.selects(k, t.shape)}
    expected = reference_cart(tuned, 0.25, 1.0, selected)
    eps = torch.finfo(dtype).eps
    avg = mean(tuned)
    for key in selected:
        # at most one unit in the last place apart (rounding once vs rounding the fp64 value)
        torch.testing.assert_close(
            merged[key].float(), expected[key].to(dtype).float(), rtol=eps, atol=1e-6
        )
        # far finer than the CART update itself, which this therefore sees
        update = (expected[key] - avg[key].double()).abs().max().item()
        assert update > 10 * eps * expected[key].abs().max().item(), key
    grid = CartFactors.factorize(tuned, max_rank_ratio=0.25, device="cpu").merge(0.25, 1.0)
    for key in merged:
        assert grid[key].dtype == dtype
        assert torch.equal(grid[key], merged[key])


def test_cart_params_validate_rank_ratio():
    with pytest.raises(ValueError):
        CartParams(rank_ratio=1.5)
    with pytest.raises(ValueError):
        CartParams(rank_ratio=0)
    assert CartParams(rank_ratio="0.5", include="attn,mlp").include == ("attn", "mlp")


def test_the_kernel_factorizes_each_centered_vector_and_measures_its_norm(family):
    from mergeflow.kernels.cart import factorize_centered
    from mergeflow.svd import truncated_svd

    _, tuned = family
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    thetas = [t[key] for t in tuned]
    parts = factorize_centered(thetas, 3)  # θ_avg computed here
    average = sum(thetas) / len(thetas)
    torch.testing.assert_close(parts.average, average, atol=1e-6, rtol=0)
    for theta, f, norm2 in zip(thetas, parts.factors, parts.norms2.tolist(), strict=True):
        tau = theta - average
        expected = truncated_svd(tau, 3)
        torch.testing.assert_close(f.s, expected.s, atol=1e-5, rtol=0)
        assert norm2 == pytest.approx(float(tau.square().sum()), rel=1e-5)
