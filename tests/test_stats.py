"""Intervals and paired comparisons (mergeflow.stats) and the selection that uses them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import candidate

from mergeflow.candidates import cart_point
from mergeflow.report import compare, table, text
from mergeflow.selection import Evidence, GridPoint, grid_edges, select
from mergeflow.stats import (
    mean_interval,
    pack,
    paired_bootstrap,
    paired_differences,
    unpack,
    wilson,
)


def test_wilson_matches_the_closed_form_and_stays_inside_zero_and_one():
    low, high = wilson(81, 100)
    # Wilson's interval for 81/100 at 95%: 0.7222 to 0.8749 (Newcombe 1998, method 3)
    assert low == pytest.approx(0.7222, abs=5e-4) and high == pytest.approx(0.8749, abs=5e-4)
    assert wilson(0, 20)[0] == 0.0 and 0 < wilson(0, 20)[1] < 0.2
    assert wilson(20, 20)[1] == 1.0
    narrow, wide = wilson(400, 800), wilson(50, 100)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError, match="at least one image"):
        wilson(0, 0)
    with pytest.raises(ValueError, match="11 correct of 10"):
        wilson(11, 10)


def test_mean_interval_shrinks_with_more_images_and_covers_the_mean():
    accuracy = {"a": 0.8, "b": 0.6}
    small = mean_interval(accuracy, {"a": 50, "b": 50})
    large = mean_interval(accuracy, {"a": 5000, "b": 5000})
    assert small[0] < large[0] < 0.7 < large[1] < small[1]


def test_packed_correctness_round_trips():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 401):
        correct = rng.random(n) < 0.5
        assert np.array_equal(unpack(pack(correct), n), correct)
    with pytest.raises(ValueError, match="holds 8 images, not 9"):
        unpack(pack(np.ones(8, dtype=bool)), 9)


def _models(rng, n, p_a, p_b, shared=0.9):
    """Two models' correctness on the same n images; most of their outcomes shared."""
    base = rng.random(n) < (p_a + p_b) / 2
    a = np.where(rng.random(n) < shared, base, rng.random(n) < p_a)
    b = np.where(rng.random(n) < shared, base, rng.random(n) < p_b)
    return a, b


def test_a_paired_bootstrap_sees_a_real_gap_and_not_noise():
    rng = np.random.default_rng(1)
    # b is a with 40 of 400 right answers turned wrong, per task: a real 10-point gap
    a = {t: rng.random(400) < 0.7 for t in ("x", "y")}
    b = {t: a[t].copy() for t in a}
    for t in b:
        b[t][np.flatnonzero(b[t])[:40]] = False
    gap = paired_bootstrap(a, b)
    assert gap.difference == pytest.approx(0.1)
    assert gap.distinguishable and 0.07 < gap.low < 0.1 < gap.high < 0.13
    # the same model against itself, and two models that differ on 2 of 400 images
    assert paired_bootstrap(a, a).difference == 0.0
    c = {t: a[t].copy() for t in a}
    c["x"][np.flatnonzero(~c["x"])[:2]] = True
    close = paired_bootstrap(c, a)
    assert close.difference > 0 and not close.distinguishable


def test_pairing_is_what_makes_small_gaps_visible():
    """Two models that agree on most images: the paired interval is far narrower than the
    one two independent splits would give (what an unpaired comparison would see)."""
    rng = np.random.default_rng(2)
    a, b = _models(rng, 2000, 0.75, 0.70, shared=0.95)
    paired = paired_bootstrap({"t": a}, {"t": b})
    unpaired_half = 1.96 * np.sqrt(2 * 0.72 * 0.28 / 2000)
    assert (paired.high - paired.low) / 2 < unpaired_half / 2


def test_weights_turn_accuracy_into_normalized_accuracy():
    a = {"x": np.array([1, 1, 0, 0], bool), "y": np.array([1, 1, 1, 1], bool)}
    b = {"x": np.array([0, 0, 0, 0], bool), "y": np.array([1, 1, 1, 1], bool)}
    # x: +0.5 accuracy, weight 1 / 0.5 -> +1.0; y: 0; mean over tasks 0.5
    assert paired_bootstrap(a, b, {"x": 2.0, "y": 1.0}).difference == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not scored on the same images"):
        paired_differences({"a": a, "b": {"x": np.ones(3, bool), "y": b["y"]}}, [("a", "b")])
    with pytest.raises(ValueError, match="different tasks"):
        paired_bootstrap(a, {"x": b["x"]})


def _point(family, c, correct, weights=None):
    accuracy = {t: float(v.mean()) for t, v in correct.items()}
    mean = sum(accuracy.values()) / len(accuracy)
    return GridPoint(
        family, c, {"accuracy": accuracy, "mean_normalized": mean, "mean_accuracy": mean}
    )


def test_the_tie_rule_decides_between_points_the_images_cannot_tell_apart():
    rng = np.random.default_rng(3)
    right = {t: rng.random(200) < 0.6 for t in ("x", "y")}

    def changed(better, worse, seed):  # ``right`` with some images turned, each way
        out, pick = {t: v.copy() for t, v in right.items()}, np.random.default_rng(seed)
        for t in out:
            wrong, good = np.flatnonzero(~out[t]), np.flatnonzero(out[t])
            out[t][pick.choice(wrong, better, replace=False)] = True
            out[t][pick.choice(good, worse, replace=False)] = False
        return out

    # as merges do, CART and TIES disagree on many images (~15%), TIES 2 ahead per task
    cart, ties = changed(15, 15, 10), changed(16, 14, 11)
    average = changed(0, 30, 12)  # averaging: 30 images worse per task
    points = [
        _point("cart", cart_point(0.12, 1.0), cart),
        _point("ties", candidate("ties", density=0.2), ties),
    ]
    correct = {p.candidate.label: c for p, c in zip(points, (cart, ties), strict=True)}
    correct["weight averaging"] = average
    chosen = select(points, Evidence(correct, {"x": 1.0, "y": 1.0}, "weight averaging"))
    # TIES is 2 images ahead per task: noise; the tie rule prefers CART
    assert chosen.winner is points[0] and chosen.by_tie_rule
    assert chosen.runner_up.other == "ties density=0.2"
    assert chosen.runner_up.difference.difference < 0
    assert "not distinguishable from the top point ties density=0.2" in chosen.why()
    assert chosen.versus_average.difference.distinguishable
    assert not any("weight averaging" in w for w in chosen.warnings())
    # a real lead is kept: TIES 30 images ahead per task
    points[1] = _point("ties", candidate("ties", density=0.2), changed(45, 15, 11))
    correct["ties density=0.2"] = changed(45, 15, 11)
    chosen = select(points, Evidence(correct, {"x": 1.0, "y": 1.0}, "weight averaging"))
    assert chosen.winner is points[1] and not chosen.by_tie_rule
    assert "better beyond the selection images' noise" in chosen.why()
    # without evidence: the best score wins, as before
    assert select(points).winner is points[1]
    # a winner that averaging matches is said to be no better than it
    correct["weight averaging"] = changed(45, 15, 11)
    chosen = select(points, Evidence(correct, {"x": 1.0, "y": 1.0}, "weight averaging"))
    assert any("not shown better than weight averaging" in w for w in chosen.warnings())
    record = chosen.record()
    assert record["winner"] == "ties density=0.2" and record["runner_up"]["other"].startswith(
        "cart"
    )
    with pytest.raises(ValueError, match="no per-image correctness"):
        select(points, Evidence({}, {"x": 1.0, "y": 1.0}))


def test_points_on_an_edge_of_their_search_are_named_with_the_field_to_extend():
    correct = {"x": np.ones(4, bool)}
    points = [_point("cart", cart_point(r, s), correct) for r in (0.1, 0.2) for s in (1.0, 2.0)] + [
        _point("ta", candidate("task_arithmetic", scale=s), correct) for s in (0.1, 0.3, 0.5)
    ]
    chosen = {"cart": points[3], "ta": points[5]}  # rank 0.2 scale 2.0; TA scale 0.3
    notes = [note for _, note in grid_edges(points, chosen)]
    assert notes == [
        "cart: rank_ratio 0.2 is the largest searched: extend grid.rank_ratios",
        "cart: scale 2.0 is the largest searched: extend grid.scales",
    ]
    low = grid_edges(points, {"ta": points[4]})
    assert low == (
        ("ta", "ta: scale 0.1 is the smallest searched: extend search.scale of family 'ta'"),
    )
    # full rank cannot be extended; one searched value is no search
    full = [_point("cart", cart_point(r, 1.0), correct) for r in (0.5, 1.0)]
    assert grid_edges(full, {"cart": full[1]}) == ()


def test_the_report_carries_intervals_to_the_table_and_the_text():
    scores = {"finetuned": {"x": 0.9, "y": 0.8}, "cart": {"x": 0.6, "y": 0.5}}
    kinds = {"finetuned": "reference", "cart": "data-free"}
    comparison = compare(kinds, scores, sizes={"x": 100, "y": 200})
    low, high = comparison["cart"]["interval"]["x"]
    assert (low, high) == pytest.approx(wilson(60, 100))
    assert comparison["cart"]["mean_interval"][0] < 0.55 < comparison["cart"]["mean_interval"][1]
    rendered = table(comparison, ["x", "y"])
    cart_row = next(line for line in rendered.splitlines() if line.startswith("cart"))
    low, high = (100 * v for v in comparison["cart"]["mean_interval"])
    assert "55.0" in cart_row and f"{low:.1f}-{high:.1f}" in cart_row
    result = {
        "comparison": comparison,
        "best": {"label": "cart"},
        "selection": {"why": "cart: the reason", "warnings": ["look at this"]},
        "registration": {"name": "m", "version": "2", "aliases": ["champion"], "reused": True},
        "store_usage": {"scores": {"reused": 3, "computed": 1}},
        "charts": {},
    }
    out = text(result)
    assert "chosen: cart: the reason" in out and "warning: look at this" in out
    assert "models:/m/2 (champion; already registered, no new version)" in out
    assert "result store: reused 3 scores; computed 1 scores" in out
