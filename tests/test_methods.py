"""Each merge method against properties its paper states, on tiny real open_clip towers."""

from __future__ import annotations

import pytest
import torch
from conftest import finetune_like, tiny_tower_state

from mergeflow import ParameterError
from mergeflow.cart_grid import CartFactors
from mergeflow.cart_index import CartIndex
from mergeflow.checkpoints import StateDictReader
from mergeflow.merge import merge_readers
from mergeflow.methods import METHODS
from mergeflow.order_stats import OrderStatistics
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
    stats = OrderStatistics()
    for chunk in chunks:
        stats.observe(chunk)
    stats.next_pass(ranks)
    for chunk in chunks:
        stats.observe(chunk)
    assert stats.values() == [everything[r].item() for r in ranks]


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
    with pytest.raises(ParameterError, match="task 9 is out of range for 4"):
        merge("tall_masks", base, finetuned, task=9)


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
    }
    assert expected <= set(METHODS)
    for method in METHODS.values():
        assert method.reference and method.summary
        with pytest.raises(ParameterError, match=f"method {method.name!r} has no parameter"):
            method.parse_params({"task": 0, "no_such_parameter": 1})


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
