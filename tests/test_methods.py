"""Each merge method against properties its paper states, on tiny real open_clip towers."""

from __future__ import annotations

import pytest
import torch
from conftest import finetune_like, order_statistics_of, tiny_tower_state

from mergeflow import ParameterError
from mergeflow.cart_grid import CartFactors
from mergeflow.cart_index import CartIndex
from mergeflow.checkpoints import StateDictReader
from mergeflow.merge import merge_readers
from mergeflow.methods import METHODS
from mergeflow.order_stats import OrderStatistics, kth_smallest
from mergeflow.svd import energy_rank, resolve_device

MATRIX = "visual.transformer.resblocks.0.mlp.c_fc.weight"


def readers(states):
    return [StateDictReader(s, f"task{i}") for i, s in enumerate(states)]


def merge(method, base, finetuned, **params):
    base_reader = StateDictReader(base, "base") if base is not None else None
    return merge_readers(method, readers(finetuned), base_reader, params=params, device="cpu")


def assert_states_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


def from_base(base, vectors):
    return [{k: base[k] + v[k] for k in base} for v in vectors]


@pytest.fixture(scope="module")
def models():
    base = tiny_tower_state(seed=11)
    return base, finetune_like(base, num_tasks=4, seed=12)


# --- exact order statistics (TIES / PCB thresholds without flattening the model) ---------


@pytest.mark.parametrize("seed", [0, 1])
def test_streamed_order_statistics_equal_a_sort(seed):
    gen = torch.Generator().manual_seed(seed)
    chunks = [
        torch.randn(n, generator=gen) * 10 ** torch.randint(-3, 3, (1,)).item()
        for n in (1000, 37, 5000, 1)
    ]
    chunks.append(torch.tensor([0.0, -0.0, 2.5, 2.5, -7.0, float("inf")]))
    everything = torch.sort(torch.cat(chunks)).values
    ranks = [0, 1, 17, 3000, everything.numel() // 2, everything.numel() - 1]
    assert order_statistics_of(chunks, ranks) == [everything[r].item() for r in ranks]


def test_order_statistics_at_the_ends_of_the_float_range_and_in_half_precision():
    values = torch.tensor([float("-inf"), -3.0e38, -1.0, 0.0, 2.0, 3.0e38, float("inf")])
    assert order_statistics_of([values], list(range(7))) == values.tolist()
    half = torch.tensor([0.5, -2.0, 1.5, 0.25], dtype=torch.bfloat16)
    assert order_statistics_of([half], [0, 1, 2, 3]) == [-2.0, 0.25, 0.5, 1.5]


def test_order_statistics_count_exactly_beyond_float32s_integers():
    # 2**24 + 1 zeros: a float32 counter cannot hold that count
    zeros = torch.zeros(2**24 + 1)
    tail = torch.tensor([1.0, 2.0])
    assert order_statistics_of([zeros, tail], [2**24, 2**24 + 1, 2**24 + 2]) == [0.0, 1.0, 2.0]


def test_kth_smallest_is_kthvalue_and_selects_on_a_bracket(monkeypatch):
    """Exact on ties, sorted input and a sample unlike the whole (the fallback); the fast
    path selects over a small bracket, never over the whole tensor."""
    gen = torch.Generator().manual_seed(0)
    size = 700_000
    spiky = torch.rand(size, generator=gen)
    spiky[:: size // (1 << 16)] = 5.0  # every sampled entry is the largest: the bracket misses
    inputs = {
        "normal": torch.randn(size, generator=gen).abs(),
        "ties": torch.randint(0, 50, (size,), generator=gen).float(),
        "sorted": torch.rand(size, generator=gen).sort().values.reshape(700, 1000),
        "spiky": spiky,
    }
    selected_sizes = []
    kthvalue = torch.Tensor.kthvalue

    def counting(self, k, *args, **kwargs):
        selected_sizes.append(self.numel())
        return kthvalue(self, k, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "kthvalue", counting)
    for name, values in inputs.items():
        for rank in (0, 1, size // 2, int(0.8 * size), size - 1):
            selected_sizes.clear()
            got = kth_smallest(values, rank)
            want = float(kthvalue(values.reshape(-1), rank + 1).values)
            assert got == want, (name, rank)
            if name == "normal" and 0 < rank < size - 1:
                assert max(selected_sizes) < size // 10, (rank, selected_sizes)
    selected_sizes.clear()
    kth_smallest(spiky, size // 2)
    assert selected_sizes == [size]  # the fallback ran on the whole
    with pytest.raises(ValueError, match="rank 5 is outside 5 values"):
        kth_smallest(torch.arange(5.0), 5)


def test_order_statistics_refuse_misuse():
    stats = OrderStatistics()
    stats.observe(torch.arange(5.0))
    with pytest.raises(RuntimeError, match="^values are known after the second pass$"):
        stats.values()
    with pytest.raises(ValueError, match="^rank 5 is outside a stream of 5 values$"):
        stats.next_pass([5])
    with pytest.raises(ValueError, match="^rank -1 is outside a stream of 5 values$"):
        stats.next_pass([-1])
    stats.next_pass([4])
    with pytest.raises(RuntimeError, match="^OrderStatistics takes exactly two passes$"):
        stats.next_pass([0])


# --- TIES -----------------------------------------------------------------------------


def test_ties_at_full_density_without_sign_conflict_is_the_mean_task_vector(models):
    base, _ = models
    gen = torch.Generator().manual_seed(3)
    vectors = [
        {k: 0.01 + torch.rand(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)
    ]
    finetuned = from_base(base, vectors)
    merged = merge("ties", base, finetuned, density=1.0, scale=1.0)
    arithmetic = merge("task_arithmetic", base, finetuned, scale=1 / 3)
    assert_states_close(merged, arithmetic)


def test_ties_trims_by_magnitude_over_the_whole_model(models):
    base, _ = models
    gen = torch.Generator().manual_seed(4)
    vectors = [{k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}]
    vectors[0][MATRIX] = vectors[0][MATRIX] * 1e4  # this tensor holds the largest entries
    finetuned = from_base(base, vectors)
    total = sum(v.numel() for v in base.values())
    density = base[MATRIX].numel() / total
    merged = merge("ties", base, finetuned, density=density, scale=1.0)
    kept = {k: int(((merged[k] - base[k]).abs() > 0).sum()) for k in base}
    # the whole budget goes to the one large tensor (a per-tensor trim would spread it); the
    # reference code keeps the entry at the threshold too, hence one more
    assert kept[MATRIX] == base[MATRIX].numel()
    assert sum(kept.values()) == kept[MATRIX] + 1


def test_ties_elects_the_sign_of_the_larger_mass(models):
    base, _ = models
    vectors = [
        {k: torch.full_like(v, 1.0) for k, v in base.items()},
        {k: torch.full_like(v, 0.5) for k, v in base.items()},
        {k: torch.full_like(v, -1.2) for k, v in base.items()},
    ]
    merged = merge("ties", base, from_base(base, vectors), density=1.0, scale=1.0)
    # sum is +0.3, so the two positive entries win and are averaged: 0.75
    torch.testing.assert_close(merged[MATRIX] - base[MATRIX], torch.full_like(base[MATRIX], 0.75))


def _ties_over_the_flattened_model(base, finetuned, density, aggregate, scale, vectors=None):
    """The paper's algorithm as its reference code writes it: each task vector flattened over
    the whole model, trimmed at its k-th smallest magnitude (k = d − int(d · density), that
    entry kept), signs elected by summed mass, the agreeing entries averaged or summed."""
    keys = list(base)
    flat_base = torch.cat([base[k].flatten() for k in keys])
    if vectors is None:  # task vectors from the models, or given (no rounding of θ + τ − θ)
        vectors = [{k: m[k] - base[k] for k in keys} for m in finetuned]
    taus = torch.stack([torch.cat([v[k].flatten() for k in keys]) for v in vectors])
    d = taus.shape[1]
    threshold = taus.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    trimmed = torch.where(taus.abs() >= threshold, taus, torch.zeros_like(taus))
    sign = torch.where(trimmed.sum(0) < 0, -1.0, 1.0)
    agrees = trimmed * sign > 0
    merged = (trimmed * agrees).sum(0)
    if aggregate == "mean":
        merged = merged / agrees.sum(0).clamp(min=1)
    flat = flat_base + scale * merged
    out, start = {}, 0
    for k in keys:
        out[k] = flat[start : start + base[k].numel()].view_as(base[k])
        start += base[k].numel()
    return out


@pytest.mark.parametrize("aggregate", ["mean", "sum"])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_equals_the_algorithm_over_the_flattened_model(models, density, aggregate):
    # what the FusionBench agreement test checks, kept in a test that runs without it
    base, finetuned = models
    merged = merge("ties", base, finetuned, density=density, scale=0.7, aggregate=aggregate)
    expected = _ties_over_the_flattened_model(base, finetuned, density, aggregate, 0.7)
    assert_states_close(merged, expected, atol=1e-6)


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_with_trim_tensor_is_the_algorithm_over_each_tensor_alone(models, density):
    base, finetuned = models
    merged = merge("ties", base, finetuned, density=density, scale=0.7, trim="tensor")
    for key in base:
        alone = _ties_over_the_flattened_model(
            {key: base[key]}, [{key: m[key]} for m in finetuned], density, "mean", 0.7
        )
        torch.testing.assert_close(merged[key], alone[key], atol=1e-6, rtol=0, msg=key)
    # and the model-wide trim is another merge
    model_wide = merge("ties", base, finetuned, density=density, scale=0.7)
    assert any(not torch.allclose(merged[k], model_wide[k]) for k in base)


# --- DARE -----------------------------------------------------------------------------


def test_dare_without_drop_is_task_arithmetic(models):
    base, finetuned = models
    assert_states_close(
        merge("dare", base, finetuned, p=0.0, scale=0.4),
        merge("task_arithmetic", base, finetuned, scale=0.4),
    )


def test_dare_drops_at_its_rate_rescales_and_is_seeded(models):
    base, finetuned = models
    one = [finetuned[0]]
    a = merge("dare", base, one, p=0.7, seed=5, scale=1.0)
    b = merge("dare", base, one, p=0.7, seed=5, scale=1.0)
    c = merge("dare", base, one, p=0.7, seed=6, scale=1.0)
    assert_states_close(a, b, atol=0)
    delta = a[MATRIX] - base[MATRIX]
    tau = finetuned[0][MATRIX] - base[MATRIX]
    kept = delta != 0
    assert 0.25 < kept.float().mean().item() < 0.35
    torch.testing.assert_close(delta[kept], tau[kept] / 0.3)
    assert not torch.equal(a[MATRIX], c[MATRIX])


def test_dare_with_ties_and_no_drop_is_ties(models):
    base, finetuned = models
    assert_states_close(
        merge("dare", base, finetuned, p=0.0, combine="ties", density=0.3, scale=0.8),
        merge("ties", base, finetuned, density=0.3, scale=0.8),
    )


def test_task_vectors_from_the_base_need_it():
    from mergeflow.methods.task_vectors import origin_and_vectors

    with pytest.raises(ValueError, match="^task vectors from the base need the base tensor$"):
        origin_and_vectors([torch.zeros(2)], None, "base")


def test_random_drop_rescales_unless_told_not_to():
    from mergeflow.methods.task_vectors import random_drop

    tau = torch.ones(1000)
    (rescaled,) = random_drop("k", [tau], p=0.5, seed=1)
    assert set(rescaled.unique().tolist()) == {0.0, 2.0}
    (kept,) = random_drop("k", [tau], p=0.5, seed=1, rescale=False)
    assert torch.equal(kept * 2, rescaled)


def _dare_mask(seed, key, task, shape, p):
    """DARE's documented mask rule: a CPU generator seeded by the first 8 bytes (little
    endian, 63 bits) of sha256("{seed}/{key}/{task}"); an entry is kept when its draw ≥ p."""
    import hashlib

    digest = hashlib.sha256(f"{seed}/{key}/{task}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(shape, generator=generator) >= p


def test_dare_masks_follow_their_seed_rule_per_key_and_task(models):
    base, finetuned = models
    merged = merge("dare", base, finetuned[:2], p=0.4, seed=9, scale=1.0, rescale=False)
    taus = [m[MATRIX] - base[MATRIX] for m in finetuned[:2]]
    masks = [_dare_mask(9, MATRIX, t, taus[t].shape, 0.4) for t in range(2)]
    expected = base[MATRIX] + taus[0] * masks[0] + taus[1] * masks[1]  # not rescaled
    torch.testing.assert_close(merged[MATRIX], expected, atol=1e-6, rtol=0)
    other = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    assert not torch.equal(masks[0], masks[1])  # tasks draw their own masks
    assert not torch.equal(masks[0], _dare_mask(9, other, 0, taus[0].shape, 0.4))


@pytest.mark.parametrize("center", ["base", "average"])
def test_dare_with_ties_trims_what_survived_the_drop(models, center):
    base, finetuned = models
    p, density = 0.4, 0.3
    origin = merge("average", None, finetuned) if center == "average" else base
    dropped = [
        {k: (m[k] - origin[k]) * _dare_mask(3, k, t, origin[k].shape, p) / (1 - p) for k in origin}
        for t, m in enumerate(finetuned)
    ]
    expected = _ties_over_the_flattened_model(origin, None, density, "mean", 0.7, dropped)
    merged = merge(
        "dare",
        base,
        finetuned,
        p=p,
        seed=3,
        combine="ties",
        density=density,
        scale=0.7,
        center=center,
    )
    assert_states_close(merged, expected, atol=1e-5)


def test_ties_keeps_the_entry_at_its_threshold():
    # d = 10 entries at density 0.9: int(d · density) = 9 kept by the count, and the entry at
    # the threshold (the smallest) kept too, as the reference code's kthvalue rule does
    base = {"w": torch.zeros(10)}
    finetuned = [{"w": torch.arange(1.0, 11.0)}]
    merged = merge("ties", base, finetuned, density=0.9, scale=1.0)
    expected = _ties_over_the_flattened_model(base, finetuned, 0.9, "mean", 1.0)
    torch.testing.assert_close(merged["w"], expected["w"])
    assert bool((merged["w"] != 0).all())


# --- TSV-M ----------------------------------------------------------------------------


def test_tsv_m_of_one_task_keeps_its_singular_directions(models):
    base, finetuned = models
    merged = merge("tsv_m", base, finetuned[:1], scale=1.0)
    assert_states_close(merged, finetuned[0], atol=2e-5)


def test_tsv_m_adds_tasks_in_orthogonal_subspaces_without_interference(models):
    base, _ = models
    m, n = base[MATRIX].shape
    gen = torch.Generator().manual_seed(8)
    vectors = []
    for t in range(2):  # task t lives in rows/columns of its own half
        v = {k: torch.zeros_like(x) for k, x in base.items()}
        block = torch.zeros(m, n)
        rows, cols = slice(t * m // 2, (t + 1) * m // 2), slice(t * n // 2, (t + 1) * n // 2)
        block[rows, cols] = torch.randn(m // 2, n // 2, generator=gen)
        v[MATRIX] = block
        vectors.append(v)
    merged = merge("tsv_m", base, from_base(base, vectors), scale=1.0)
    k = min(m, n) // 2
    expected = torch.zeros(m, n)
    for v in vectors:
        u, s, vh = torch.linalg.svd(v[MATRIX])
        expected += u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    torch.testing.assert_close(merged[MATRIX] - base[MATRIX], expected, atol=1e-5, rtol=1e-4)


# --- Iso-C / Iso-CTS ------------------------------------------------------------------


def test_tsv_m_leaves_a_matrix_with_fewer_directions_than_tasks_at_its_origin():
    # min(m, n) = 2 < T = 3: no task gets a singular direction (k = 0), as in TSV's code
    base = {"w": torch.zeros(2, 6), "b": torch.zeros(6)}
    gen = torch.Generator().manual_seed(0)
    finetuned = [
        {k: torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)
    ]
    merged = merge("tsv_m", base, finetuned, scale=1.0)
    assert torch.equal(merged["w"], base["w"])
    torch.testing.assert_close(merged["b"], sum(m["b"] for m in finetuned) / 3)


def test_iso_c_flattens_the_spectrum(models):
    base, finetuned = models
    merged = merge("iso_c", base, finetuned, scale=1.0)
    s = torch.linalg.svdvals(merged[MATRIX] - base[MATRIX])
    summed = torch.stack([f[MATRIX] - base[MATRIX] for f in finetuned]).sum(0)
    torch.testing.assert_close(s, torch.full_like(s, torch.linalg.svdvals(summed).mean().item()))


def test_iso_cts_with_only_a_common_subspace_is_iso_c(models):
    base, finetuned = models
    assert_states_close(
        merge("iso_cts", base, finetuned, scale=1.2, common_fraction=1.0),
        merge("iso_c", base, finetuned, scale=1.2),
    )


def test_iso_cts_spectrum_is_flat(models):
    base, finetuned = models
    merged = merge("iso_cts", base, finetuned, scale=1.0, common_fraction=0.5)
    s = torch.linalg.svdvals(merged[MATRIX] - base[MATRIX])
    torch.testing.assert_close(s, torch.full_like(s, s.mean().item()), rtol=1e-4, atol=1e-5)


# --- TALL masks / Consensus -----------------------------------------------------------


def test_tall_mask_at_lambda_zero_is_the_multi_task_model(models):
    base, finetuned = models
    merged = merge("tall_masks", base, finetuned, task=2, mask_lambda=0.0)
    assert_states_close(merged, merge("task_arithmetic", base, finetuned, scale=1.0))


def test_tall_mask_keeps_where_the_task_outweighs_the_others(models):
    base, finetuned = models
    merged = merge("tall_masks", base, finetuned, task=1, mask_lambda=0.5)
    taus = torch.stack([f[MATRIX] - base[MATRIX] for f in finetuned])
    mask = taus[1].abs() > 0.5 * (taus.sum(0) - taus[1]).abs()
    assert 0 < mask.float().mean() < 1
    torch.testing.assert_close(merged[MATRIX] - base[MATRIX], mask * taus.sum(0))


def test_consensus_bounds(models):
    base, finetuned = models
    everyone = merge("consensus", base, finetuned, k=1, mask_lambda=0.0, scale=0.5)
    assert_states_close(everyone, merge("task_arithmetic", base, finetuned, scale=0.5))
    nobody = merge("consensus", base, finetuned, k=len(finetuned) + 1, scale=0.5)
    assert_states_close(nobody, base, atol=0)


def test_tall_masks_rejects_a_task_out_of_range(models):
    base, finetuned = models
    with pytest.raises(ParameterError, match="^method 'tall_masks': task 9 is out of range for 4"):
        merge("tall_masks", base, finetuned, task=9)


def test_tall_masks_and_consensus_at_their_boundaries():
    """m_t = |τ_t| > λ|τ_MTL − τ_t| is strict (as the paper's code writes it): entry 0 has
    |τ_t| equal to λ|τ_MTL − τ_t| for both tasks; entry 1 is needed by task 0 alone.
    Consensus keeps what at least k tasks need (k included)."""
    base = {"w": torch.zeros(2)}
    finetuned = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.0, 0.5])}]
    kept = torch.tensor([0.0, 2.5])  # where the mask holds, τ_MTL
    tall = merge("tall_masks", base, finetuned, task=0, mask_lambda=1.0)
    torch.testing.assert_close(tall["w"], kept)
    torch.testing.assert_close(
        merge("tall_masks", base, finetuned, task=1, mask_lambda=1.0)["w"], torch.zeros(2)
    )
    consensus = merge("consensus", base, finetuned, k=1, mask_lambda=1.0, scale=1.0)
    torch.testing.assert_close(consensus["w"], kept)
    none = merge("consensus", base, finetuned, k=2, mask_lambda=1.0, scale=1.0)
    torch.testing.assert_close(none["w"], torch.zeros(2))


def test_tall_masks_centered_start_from_the_average(models):
    _, finetuned = models
    averaged = merge("average", None, finetuned)
    assert_states_close(
        merge("tall_masks", None, finetuned, task=1, center="average"),
        merge("tall_masks", averaged, finetuned, task=1, center="base"),
        atol=1e-6,
    )


# --- PCB ------------------------------------------------------------------------------


def reference_pcb(base, finetuned, ratio, clip, scale):
    """PCB written from the paper over the flattened model, with sorts."""
    keys = list(base)
    flat = torch.stack([torch.cat([(f[k] - base[k]).reshape(-1) for k in keys]) for f in finetuned])
    n, d = flat.shape

    def clamp(x, low_ratio, high_ratio):
        ordered = torch.sort(x, dim=1).values
        low = ordered[:, int(d * low_ratio)].unsqueeze(1)
        high = ordered[:, int(d * (1 - high_ratio)) - 1].unsqueeze(1)
        return torch.clamp(x, low, high)

    def normalize(x):
        low, high = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        return (x - low) / (high - low)

    magnitude = clamp(flat.abs(), clip, clip)
    intra = torch.exp(n * normalize(magnitude) ** 2)
    inter = torch.tanh(flat * flat.sum(0))
    weight = normalize(clamp(intra * inter, 1 - ratio, 0))
    merged = (torch.sign(flat) * magnitude * weight).sum(0) / weight.sum(0).clamp(min=1e-12)
    out, offset = {}, 0
    for k in keys:
        size = base[k].numel()
        out[k] = base[k] + scale * merged[offset : offset + size].reshape(base[k].shape)
        offset += size
    return out


@pytest.mark.parametrize(("ratio", "clip"), [(0.1, 0.0001), (0.3, 0.01)])
def test_pcb_streamed_equals_the_flattened_algorithm(models, ratio, clip):
    base, finetuned = models
    merged = merge("pcb", base, finetuned, ratio=ratio, clip=clip, scale=1.0)
    assert_states_close(merged, reference_pcb(base, finetuned, ratio, clip, 1.0), atol=1e-6)


# --- centering (CART's idea on every task-vector method) ------------------------------


def test_centered_task_arithmetic_is_weight_averaging(models):
    _, finetuned = models
    assert_states_close(
        merge("task_arithmetic", None, finetuned, center="average", scale=0.7),
        merge("average", None, finetuned),
    )


@pytest.mark.parametrize(
    "method", ["ties", "dare", "tsv_m", "iso_c", "iso_cts", "consensus", "pcb"]
)
def test_centered_methods_need_no_base_and_start_from_the_average(models, method):
    """Centering is the method itself with θ_avg as its origin: the same merge as giving
    the weight average as the base (thresholds, signs and subspaces all from θ_t − θ_avg)."""
    base, finetuned = models
    merged = merge(method, None, finetuned, center="average")
    averaged = merge("average", None, finetuned)
    assert_states_close(merged, merge(method, averaged, finetuned, center="base"), atol=1e-6)
    # and not the base's origin, nor the average itself
    from_the_base = merge(method, base, finetuned, center="base")
    assert not all(torch.allclose(merged[k], from_the_base[k], atol=1e-4) for k in merged)
    assert not all(torch.equal(merged[k], averaged[k]) for k in merged)
    with pytest.raises(ParameterError, match="needs a base checkpoint"):
        merge(method, None, finetuned)


# --- CART's variants: spectral-energy rank, compression -------------------------------


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: total 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.65) == 2
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(s[:2], 1.0, total=14.0) == 3  # beyond what the factors hold


def test_cart_by_energy_picks_a_rank_per_matrix_and_task(models):
    _, finetuned = models
    full = merge("cart", None, finetuned, energy=1.0)
    assert_states_close(full, merge("average", None, finetuned), atol=2e-5)
    factors = CartFactors.factorize(readers(finetuned), max_rank_ratio=1.0, device="cpu")
    assert_states_close(
        factors.merge(energy=0.6, scale=1.3, device="cpu"),
        merge("cart", None, finetuned, energy=0.6, scale=1.3),
    )
    low = CartFactors.factorize(readers(finetuned), max_rank_ratio=0.05, device="cpu")
    with pytest.raises(ParameterError, match="needs more than the 1 factorized"):
        low.merge(energy=0.99, device="cpu")


def test_cart_indexed_by_energy_keeps_the_fewest_triplets_holding_that_share(models):
    _, finetuned = models
    merged = merge("cart_indexed", None, finetuned, task=2, energy=0.6)
    average = {k: sum(m[k] for m in finetuned) / len(finetuned) for k in finetuned[0]}
    tau = finetuned[2][MATRIX] - average[MATRIX]
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    share = torch.cumsum(s**2, 0) / (s**2).sum()
    k = int((share < 0.6).sum()) + 1  # the first rank whose share reaches 0.6
    assert 1 < k < s.numel()  # a case where the rule decides something
    expected = average[MATRIX] + u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    torch.testing.assert_close(merged[MATRIX], expected, atol=1e-5, rtol=0)
    one_less = average[MATRIX] + u[:, : k - 1] @ torch.diag(s[: k - 1]) @ vh[: k - 1]
    assert (merged[MATRIX] - one_less).abs().max() > 1e-3
    # tensors it does not select come back exactly as the task's
    bias = "visual.ln_pre.bias"
    torch.testing.assert_close(merged[bias], finetuned[2][bias], atol=1e-6, rtol=0)


def test_cart_indexed_rejects_a_task_out_of_range(models):
    _, finetuned = models
    with pytest.raises(
        ParameterError,
        match=r"^method 'cart_indexed': task 4 is out of range for 4 fine-tuned "
        r"checkpoints \(0-based\)$",
    ):
        merge("cart_indexed", None, finetuned, task=4)


def test_cart_index_at_full_rank_rebuilds_every_model(models, tmp_path):
    _, finetuned = models
    index = CartIndex.build(readers(finetuned), ["a", "b", "c", "d"], rank_ratio=1.0, device="cpu")
    index.save(tmp_path / "index.safetensors")
    loaded = CartIndex.load(tmp_path / "index.safetensors")
    for t, name in enumerate(["a", "b", "c", "d"]):
        assert_states_close(loaded.rebuild(name, device="cpu"), finetuned[t], atol=2e-5)


def test_cart_index_is_the_cart_indexed_method_and_smaller_than_the_checkpoints(models):
    _, finetuned = models
    index = CartIndex.build(readers(finetuned), ["a", "b", "c", "d"], rank_ratio=0.12)
    direct = merge("cart_indexed", None, finetuned, task=2, rank_ratio=0.12)
    assert_states_close(index.rebuild(2, device="cpu"), direct)
    checkpoints = sum(t.numel() * t.element_size() for f in finetuned for t in f.values())
    assert index.num_bytes() < 0.75 * checkpoints
    with pytest.raises(ParameterError, match="unknown task 'e'"):
        index.rebuild("e")


# --- registry, device -----------------------------------------------------------------


def test_every_method_names_its_paper_and_validates_its_parameters():
    expected = {
        "average",
        "task_arithmetic",
        "ties",
        "dare",
        "tsv_m",
        "iso_c",
        "iso_cts",
        "tall_masks",
        "consensus",
        "pcb",
        "cart",
        "cart_indexed",
        "opcm",
        "core_space",
        "lora_lego",
        "layer_recipe",
        "layer_swap",
    }
    assert expected <= set(METHODS)
    for method in METHODS.values():
        assert method.reference and method.summary
        with pytest.raises(ParameterError, match=f"method {method.name!r} has no parameter"):
            method.parse_params({"task": 0, "no_such_parameter": 1})


def test_parameter_errors_name_the_field_its_value_and_what_a_method_takes():
    from mergeflow.methods import all_methods, find_method

    with pytest.raises(ParameterError) as nested:
        METHODS["cart"].parse_params({"include": ["attn", 3]})
    assert str(nested.value) == (
        "method 'cart', parameter 'include.1': Input should be a valid string (got 3)"
    )
    with pytest.raises(ParameterError) as none:
        METHODS["average"].parse_params({"scale": 2})
    assert str(none.value) == "method 'average' has no parameter 'scale' (it takes: none)"
    with pytest.raises(ParameterError) as some:
        METHODS["task_arithmetic"].parse_params({"density": 0.2})
    assert str(some.value) == (
        "method 'task_arithmetic' has no parameter 'density' (it takes: center, scale)"
    )
    with pytest.raises(ParameterError) as unknown:
        find_method("slerp")
    known = ", ".join(sorted(all_methods()))
    assert str(unknown.value) == f"unknown merge method 'slerp' (known: {known})"


def test_a_method_describes_each_parameter_with_its_default():
    described = METHODS["ties"].describe_params().split(", ")
    assert described[:3] == [
        "center (default 'base')",
        "density (default 0.2)",
        "scale (default 1.0)",
    ]
    assert "aggregate (default 'mean')" in described
    assert "task (required)" in METHODS["cart_indexed"].describe_params().split(", ")
    assert METHODS["average"].describe_params() == "no parameters"


def test_a_low_rank_selection_describes_its_rule():
    from mergeflow.methods.cart import CartParams
    from mergeflow.methods.tsv import TsvParams

    assert CartParams().describe_rule() == "the architecture's matrices"
    assert CartParams(include=["attn"], exclude=["ln", "proj"]).describe_rule() == (
        "include attn, exclude ln,proj"
    )
    assert TsvParams().describe_rule() == "every matrix"
    two = CartParams(include=["attn", "mlp"], exclude=["c_fc"])
    assert two.describe_rule() == "include attn,mlp, exclude c_fc"
    assert not two.selects(MATRIX, (64, 32))  # excluded, though "mlp" includes it
    assert two.selects(MATRIX.replace("c_fc", "c_proj"), (32, 64))
    assert not two.selects("visual.transformer.resblocks.0.mlp.c_proj.bias", (32,))


def test_a_data_aware_method_is_refused_without_samples():
    from mergeflow.methods import get_method

    with pytest.raises(ParameterError) as refused:
        get_method("adamerging")
    assert str(refused.value) == (
        "method 'adamerging' needs samples of each task: run it from a pipeline spec "
        "(as a baseline or a grid family)"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a CPU-only machine")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(ParameterError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ParameterError, match="unknown device 'gpu'"):
        resolve_device("gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["cart", "tsv_m", "iso_cts", "ties"])
def test_cuda_merge_equals_cpu_merge_in_the_input_dtype(models, method):
    base, finetuned = models
    half = [{k: v.half() for k, v in f.items()} for f in finetuned]
    half_base = {k: v.half() for k, v in base.items()}
    cpu = merge(method, half_base, half)
    gpu = merge_readers(method, readers(half), StateDictReader(half_base), device="cuda")
    for key in cpu:
        assert gpu[key].dtype == torch.float16 and gpu[key].device.type == "cpu"
        torch.testing.assert_close(gpu[key].float(), cpu[key].float(), atol=2e-3, rtol=1e-2)
