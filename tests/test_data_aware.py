"""Data-aware merging: Fisher, RegMean, AdaMerging and CART + AdaMerging."""

from __future__ import annotations

import pytest
import torch
from conftest import candidate

from mergeflow.data_aware.fisher import fisher_merge_tensor
from mergeflow.data_aware.regmean import regmean_merge_matrix


def test_fisher_merging_with_equal_fishers_is_averaging():
    gen = torch.Generator().manual_seed(0)
    thetas = [torch.randn(5, 7, generator=gen) for _ in range(3)]
    fisher = torch.rand(5, 7, generator=gen)
    merged = fisher_merge_tensor(thetas, [fisher] * 3)
    torch.testing.assert_close(merged, torch.stack(thetas).mean(0))
    # no Fisher anywhere (a tensor no model's loss reaches): the plain average
    zero = torch.zeros(5, 7)
    torch.testing.assert_close(fisher_merge_tensor(thetas, [zero] * 3), torch.stack(thetas).mean(0))


def test_fisher_merging_follows_the_larger_fisher():
    thetas = [torch.zeros(4), torch.ones(4)]
    merged = fisher_merge_tensor(thetas, [torch.full((4,), 1.0), torch.full((4,), 3.0)])
    torch.testing.assert_close(merged, torch.full((4,), 0.75))


def test_regmean_with_identity_grams_is_averaging():
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(6, 4, generator=gen) for _ in range(3)]
    merged = regmean_merge_matrix(weights, [torch.eye(6)] * 3, alpha=0.9)
    torch.testing.assert_close(merged, torch.stack(weights).mean(0))


def test_regmean_is_the_least_squares_merge():
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(50, 6, generator=gen) for _ in range(3)]
    weights = [torch.randn(6, 4, generator=gen) for _ in range(3)]
    merged = regmean_merge_matrix(weights, [x.T @ x for x in inputs], alpha=1.0)
    # min_W Σ_t ‖X_t W − X_t W_t‖² solved by stacking the systems
    stacked = torch.linalg.lstsq(
        torch.cat(inputs), torch.cat([x @ w for x, w in zip(inputs, weights, strict=True)])
    ).solution
    torch.testing.assert_close(merged, stacked, atol=1e-4, rtol=1e-4)


def _spec_and_context(zoo, cache_folder):
    """The run of a built zoo's spec (read from its folder) and its evaluation context."""
    from conftest import run_of

    from zoo.zoo import zoo_spec

    folder, manifest = zoo
    run = run_of(zoo_spec(manifest, str(folder), "zoo-data-aware", device="cpu"), cache_folder)
    return run, run.context


@pytest.fixture(scope="module")
def local_zoo(zoo, tmp_path_factory):
    return _spec_and_context(zoo, tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize(
    ("method", "start"),
    [("adamerging", {"scale": 0.3}), ("cart_adamerging", {"scale": 1.0})],
)
@pytest.mark.parametrize("diversity", [0.0, 1.0])
def test_adaptation_lowers_the_objective_it_optimizes(local_zoo, method, start, diversity):
    """Entropy alone (AdaMerging's objective), and entropy less the diversity term."""
    run, _ = local_zoo
    adapted = candidate(method, steps=20, lr=1e-3, samples=32, diversity=diversity)
    info = adapted.learned(run)
    assert info["objective_after"] < info["objective_before"]
    if diversity == 0.0:
        assert info["objective_before"] == pytest.approx(info["entropy_before"])
        assert info["entropy_after"] < info["entropy_before"]
    else:
        # the diversity term is the entropy of the mean prediction: never above ln C
        assert info["objective_before"] < info["entropy_before"]
    coefficients = info["coefficients"]
    assert set(coefficients) == set(run.task_names)
    assert any(c != start["scale"] for row in coefficients.values() for c in row)


def test_adaptation_with_zero_steps_is_its_starting_point(local_zoo):
    run, _ = local_zoo
    state = candidate("cart_adamerging", steps=0, init=1.5).weights(run)
    start = candidate("cart", rank_ratio=0.12, scale=1.5).weights(run)
    for key in start:
        torch.testing.assert_close(state[key], start[key], atol=1e-5, rtol=1e-4)


def test_eata_selection_keeps_confident_samples_only(local_zoo):
    run, _ = local_zoo
    adapted = candidate("adamerging", steps=5, select="eata", entropy_margin=0.4, samples=32)
    kept = adapted.learned(run)["samples_kept"]
    assert all(0 <= share < 1 for share in kept.values())


def test_eata_keeps_the_confident_and_non_redundant_weighted_by_their_certainty():
    import math

    from mergeflow.data_aware.adamerging import AdaMergingParams, _eata_weights
    from mergeflow.data_aware.base import entropy

    params = AdaMergingParams(select="eata", entropy_margin=0.4, redundancy=0.95)
    e0 = 0.4 * math.log(4)
    logits = torch.tensor(
        [
            [9.0, 0.0, 0.0, 0.0],  # confident, class 0
            [0.0, 8.0, 0.0, 0.0],  # confident, class 1
            [0.1, 0.0, 0.1, 0.0],  # nearly uniform: entropy above the margin
            [9.0, 0.0, 0.1, 0.0],
        ]  # confident, class 0 again
    )
    h = entropy(logits)
    assert bool(h[2] > e0) and bool((h[[0, 1, 3]] < e0).all())
    running = [None]
    weights = _eata_weights(logits, h, params, running, 0)
    torch.testing.assert_close(weights, torch.exp(e0 - h) * torch.tensor([1.0, 1.0, 0.0, 1.0]))
    kept = torch.softmax(logits[[0, 1, 3]], -1).mean(0)
    torch.testing.assert_close(running[0], kept)  # the first mean is the kept rows' mean
    # next step: a prediction like the running mean is redundant; a different one is kept
    like_before = torch.log(kept)[None]
    other = torch.tensor([[0.0, 0.0, 0.0, 9.0]])
    both = torch.cat([like_before, other])
    weights = _eata_weights(both, entropy(both), params, running, 0)
    assert weights[0] == 0 and weights[1] > 0
    torch.testing.assert_close(
        running[0], 0.9 * kept + 0.1 * torch.softmax(other, -1)[0]
    )  # updated from the kept row only


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_fisher_and_regmean_change_only_what_their_data_reaches(local_zoo, method):
    run, _ = local_zoo
    adapted = candidate(method, samples=16)
    merged = adapted.state(run)
    averaged = candidate("average").state(run)
    changed = {k for k in merged if not torch.equal(merged[k], averaged[k])}
    assert changed and all(k.startswith("visual.") for k in changed)
    info = adapted.learned(run)
    if method == "regmean":
        # the layers whose inputs it saw changed; the attention output projections did not
        assert set(info["merged_by_regmean"]) <= changed | {"visual.proj"}
        assert not any(k.endswith("out_proj.weight") for k in changed)
    else:
        assert set(info["fisher_mass"]) == set(run.task_names)


@pytest.fixture(scope="module")
def demo_zoo_context(demo_zoo, tmp_path_factory):
    return _spec_and_context(demo_zoo, tmp_path_factory.mktemp("demo-cache"))


def _demo_adaptations():
    from flows.demo import DEMO_BASELINES

    return [
        b
        for b in DEMO_BASELINES
        if isinstance(b, dict)
        and b["method"] in ("adamerging", "cart_adamerging")
        and b["params"].get("diversity")
    ]


@pytest.mark.full  # the demo's own zoo: about 12 minutes to build
@pytest.mark.parametrize(
    "candidate", _demo_adaptations(), ids=lambda b: b.get("label", b["method"]).replace(" ", "-")
)
def test_adaptation_keeps_mean_accuracy_on_the_demo_zoo(demo_zoo_context, candidate):
    """The demo's adaptations, on the demo's zoo, against their own starting points (the same
    coefficients, no step): adapted on the validation images, scored on the test splits."""
    from conftest import candidate as candidate_for

    from mergeflow.evaluation import REPORT

    run, context = demo_zoo_context

    def mean_accuracy(chosen) -> float:
        scores = context.score(chosen.state(run), REPORT)
        return sum(scores.values()) / len(scores)

    adapted = candidate_for(candidate["method"], **candidate["params"])
    start = candidate_for(candidate["method"], **{**candidate["params"], "steps": 0})
    before, after = mean_accuracy(start), mean_accuracy(adapted)
    info = adapted.learned(run)
    assert info["objective_after"] < info["objective_before"]
    assert after >= before, f"mean test accuracy {before:.4f} -> {after:.4f} ({info})"


def test_relaxed_bernoulli_is_torchs_sample_from_the_same_generator_state():
    from mergeflow.data_aware.concrete import relaxed_bernoulli

    logits = torch.linspace(-3, 3, 40).reshape(5, 8)
    torch.manual_seed(7)
    reference = torch.distributions.RelaxedBernoulli(0.5, logits=logits).rsample()
    ours = relaxed_bernoulli(logits, 0.5, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, reference)
    # a lower temperature pushes the samples towards 0 and 1
    cold = relaxed_bernoulli(logits, 0.01, torch.Generator().manual_seed(7))
    assert ((cold < 0.01) | (cold > 0.99)).float().mean() > 0.9


@pytest.fixture(scope="module")
def tiny_inputs():
    from conftest import tiny_data_aware_inputs

    return tiny_data_aware_inputs()


def test_concrete_without_steps_is_task_arithmetic(tiny_inputs):
    from mergeflow.data_aware.concrete import ConcreteParams, run_concrete

    base, finetuned, _, inputs = tiny_inputs
    merged = run_concrete(inputs, ConcreteParams(steps=0, scale=0.3)).state
    for key in base:
        expected = base[key] + 0.3 * sum(ft[key] - base[key] for ft in finetuned)
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("over", ["task_arithmetic", "adamerging"])
def test_concrete_learns_a_mask_that_lowers_the_entropy(tiny_inputs, over):
    from mergeflow.data_aware.concrete import ConcreteParams, run_concrete

    *_, inputs = tiny_inputs
    params = ConcreteParams(over=over, steps=15, lr=5e-2, adamerging_steps=5, batch_size=8)
    outcome = run_concrete(inputs, params)
    assert outcome.info["entropy_after"] < outcome.info["entropy_before"]
    # the mask moved away from p = 0.5 (logits 0) in most entries
    assert outcome.info["mask_keep_share"] != pytest.approx(0.5, abs=1e-3)
    if over == "adamerging":
        assert set(outcome.info["coefficients"]) == {"task0", "task1", "task2"}


def test_concrete_final_mask_is_deterministic(tiny_inputs):
    from mergeflow.data_aware.concrete import ConcreteParams, run_concrete

    *_, inputs = tiny_inputs
    params = ConcreteParams(steps=3, lr=5e-2, final_mask="sample", batch_size=8)
    first, again = (run_concrete(inputs, params).state for _ in range(2))
    other = run_concrete(inputs, params.model_copy(update={"seed": 1})).state
    expected = run_concrete(inputs, params.model_copy(update={"final_mask": "expected"})).state
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    torch.testing.assert_close(first[key], again[key], atol=0, rtol=0)
    assert not torch.allclose(first[key], other[key])
    assert not torch.allclose(first[key], expected[key])


def test_concrete_and_pleas_run_in_the_pipeline(local_zoo):
    run, _ = local_zoo
    adapted = candidate("concrete", steps=4, lr=5e-2, samples=16)
    info = adapted.learned(run)
    assert info["over"] == "task_arithmetic"
    assert info["masked_tensors"] > 0
    assert info["entropy_after"] < info["entropy_before"]
    refit = candidate("pleas", samples=4).learned(run)
    assert refit["images"] == 4 * len(run.task_names)
    assert "visual.proj" in refit["fitted_by_least_squares"]


def test_pleas_layer_solve_is_the_least_squares_fit():
    from mergeflow.data_aware.pleas import least_squares_layer

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(200, 5, generator=gen)
    true_w, true_b = torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen)
    y = x @ true_w.T + true_b
    w, b = least_squares_layer(x, y, torch.zeros(3, 5), torch.zeros(3), ridge=0.0)
    torch.testing.assert_close(w, true_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, true_b, atol=1e-5, rtol=1e-5)
    # with a large ridge the fit stays at the prior (the models' average)
    prior = torch.randn(3, 5, generator=gen)
    w, _ = least_squares_layer(x, y, prior, None, ridge=1e8)
    torch.testing.assert_close(w, prior, atol=1e-4, rtol=1e-4)


def test_pleas_of_identical_models_is_that_model_and_refits_otherwise(tiny_inputs):
    from mergeflow.data_aware.base import DataAwareInputs
    from mergeflow.data_aware.pleas import PleasParams, run

    base, finetuned, samples, inputs = tiny_inputs
    same = DataAwareInputs(inputs.model, base, [finetuned[0]] * 3, samples)
    merged = run(same, PleasParams(samples=4)).state
    for key in finetuned[0]:
        torch.testing.assert_close(merged[key], finetuned[0][key], atol=1e-4, rtol=1e-4, msg=key)
    outcome = run(inputs, PleasParams(samples=4))
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert key in outcome.info["fitted_by_least_squares"]
    assert (
        "visual.transformer.resblocks.0.attn.in_proj_bias"
        in outcome.info["fitted_by_least_squares"]
    )
    average = sum(ft[key] for ft in finetuned) / 3
    assert not torch.allclose(outcome.state[key], average, atol=1e-4)
    # the out projection cannot be hooked: it is the average
    out = "visual.transformer.resblocks.0.attn.out_proj.weight"
    torch.testing.assert_close(outcome.state[out], sum(ft[out] for ft in finetuned) / 3)
