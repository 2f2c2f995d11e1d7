"""The plan (spec → typed candidates), their content keys, selection and the report: pure
library code, tested without Prefect."""

from __future__ import annotations

import math

import pytest
from conftest import candidate, finetune_like, run_of, tiny_tower_state
from pydantic import TypeAdapter

from mergeflow.candidates import (
    AnyCandidate,
    CartPoint,
    DataAware,
    FixedMethod,
    PerTask,
    cart_point,
    reference,
)
from mergeflow.checkpoints import save_state_dict
from mergeflow.plan import make_plan
from mergeflow.report import compare, markdown
from mergeflow.selection import GridPoint, select
from mergeflow.spec import MergeSpec


def _spec(**changes) -> MergeSpec:
    data = {
        "model": "ViT-B-32",
        "base": "base.safetensors",
        "tasks": [
            {"name": n, "checkpoint": f"{n}.safetensors", "dataset": {"uri": f"{n}.parquet"}}
            for n in ("a", "b", "c")
        ],
        "registered_model": "planned",
        "grid": {"rank_ratios": [0.1, 0.2], "scales": [1.0, 2.0]},
    }
    data.update(changes)
    return MergeSpec.parse(data)


def test_plan_lists_cart_grid_then_families_baselines_and_references():
    spec = _spec(
        grid={
            "rank_ratios": [0.1, 0.2],
            "scales": [1.0],
            "families": [
                {"method": "ties", "search": {"density": [0.1, 0.2]}},
                {"method": "ties", "label": "ties", "search": {"scale": [0.5]}},
            ],
        },
        baselines=["average", "finetuned", "tall_masks", {"method": "fisher"}],
    )
    plan = make_plan(spec)
    assert [(f.name, len(f.points)) for f in plan.families] == [
        ("cart", 2),
        ("ties", 2),
        ("ties 2", 1),  # a repeated family name is made distinct
    ]
    assert all(isinstance(c, CartPoint) for c in plan.families[0].points)
    assert [c.label for c in plan.families[1].points] == ["ties density=0.1", "ties density=0.2"]
    kinds = [type(c) for c in plan.baselines]
    assert kinds == [FixedMethod, PerTask, DataAware]
    assert plan.references == (reference("finetuned"),)  # zeroshot is not asked for
    assert [c.label for c in plan.data_aware] == ["fisher"]


def test_cart_that_the_factors_cannot_rebuild_is_merged_and_said_so():
    spec = _spec(
        baselines=[
            {"method": "cart", "params": {"rank_ratio": 0.2, "scale": 1.5}},
            {"method": "cart", "params": {"rank_ratio": 0.2, "include": "visual.*"}},
            {"method": "cart", "params": {"rank_ratio": 0.5}},
        ]
    )
    plan = make_plan(spec)
    fast, included, wide = plan.baselines
    assert isinstance(fast, CartPoint) and (fast.rank_ratio, fast.scale) == (0.2, 1.5)
    assert isinstance(included, FixedMethod) and isinstance(wide, FixedMethod)
    assert len(plan.notes) == 2
    assert "include" in plan.notes[0] and "beyond the grid's largest 0.2" in plan.notes[1]


def test_data_aware_candidates_are_listed_once_across_grid_and_baselines():
    quick = {"steps": 1, "samples": 4}
    spec = _spec(
        grid={
            "families": [{"method": "adamerging", "params": quick, "search": {"init": [0.2, 0.4]}}]
        },
        baselines=[{"method": "adamerging", "params": {**quick, "init": 0.2}, "label": "ada"}],
    )
    plan = make_plan(spec)
    assert len(plan.grid) == 4 * 2 + 2  # the default CART grid (4 × 2), the family's two points
    assert sorted(c.params["init"] for c in plan.data_aware) == [0.2, 0.4]


def test_candidates_cross_task_boundaries_by_kind():
    adapter = TypeAdapter(AnyCandidate)
    for c in [
        reference("zeroshot"),
        cart_point(0.1, 2.0),
        candidate("ties", density=0.2),
        candidate("tall_masks"),
        candidate("fisher", samples=8),
    ]:
        back = adapter.validate_json(adapter.dump_json(c))
        assert back == c and type(back) is type(c)


@pytest.fixture
def tiny_run(tmp_path):
    """Real checkpoint files (a tiny tower: base and three fine-tunes) and their run."""
    base = tiny_tower_state()
    save_state_dict(base, tmp_path / "base.safetensors")
    for name, state in zip("abc", finetune_like(base, 3), strict=True):
        save_state_dict(state, tmp_path / f"{name}.safetensors")
    spec = _spec(
        base=str(tmp_path / "base.safetensors"),
        tasks=[
            {
                "name": n,
                "checkpoint": str(tmp_path / f"{n}.safetensors"),
                "dataset": {"uri": f"{n}.parquet"},
            }
            for n in "abc"
        ],
    )
    return run_of(spec, tmp_path / "cache"), tmp_path


def test_content_keys_tell_models_apart_and_follow_their_inputs(tiny_run):
    run, folder = tiny_run
    keyed = {
        "zeroshot": reference("zeroshot").key(run),
        **{f"finetuned {t}": reference("finetuned").key(run, t) for t in "abc"},
        "cart point": cart_point(0.1, 1.0).key(run),
        "cart other scale": cart_point(0.1, 2.0).key(run),
        "cart streamed": candidate("cart", rank_ratio=0.1, scale=1.0).key(run),
        "ties": candidate("ties").key(run),
        "ties density": candidate("ties", density=0.3).key(run),
        **{f"tall {t}": candidate("tall_masks").key(run, t) for t in "abc"},
        "fisher": candidate("fisher").key(run),
    }
    assert len(set(keyed.values())) == len(keyed)
    # the label is a name, not content: the same recipe under another label is the same model
    assert candidate("ties", label="my ties").key(run) == keyed["ties"]
    # a per-task candidate needs its task
    with pytest.raises(Exception, match="one model per task"):
        reference("finetuned").key(run)
    # another checkpoint content: every merged key changes, the base's does not
    other = run.inputs.model_copy(
        update={"digests": {**run.digests, run.spec.tasks[0].checkpoint: "0" * 64}}
    )
    from mergeflow.run import open_run

    moved = open_run(other)
    assert reference("zeroshot").key(moved) == keyed["zeroshot"]
    assert reference("finetuned").key(moved, "b") == keyed["finetuned b"]
    assert cart_point(0.1, 1.0).key(moved) != keyed["cart point"]
    assert candidate("ties").key(moved) != keyed["ties"]
    assert candidate("fisher").key(moved) != keyed["fisher"]
    assert reference("finetuned").key(moved, "a") != keyed["finetuned a"]


def test_cart_point_from_factors_matches_the_streamed_cart(tiny_run):
    import torch

    run, _ = tiny_run
    from_factors = cart_point(0.2, 1.5).weights(run)
    streamed = candidate("cart", rank_ratio=0.2, scale=1.5).weights(run)
    assert from_factors.keys() == streamed.keys()
    for key in streamed:
        torch.testing.assert_close(from_factors[key], streamed[key], atol=1e-5, rtol=1e-4)
    with pytest.raises(Exception, match="beyond the factors' largest"):
        cart_point(0.5, 1.0).weights(run)


def _point(family, c, mean):
    return GridPoint(family, c, {"mean_normalized": mean, "mean_accuracy": mean})


def test_select_reports_each_family_and_registers_only_one_merged_model():
    points = [
        _point("cart", cart_point(0.1, 1.0), 0.80),
        _point("cart", cart_point(0.2, 1.0), 0.85),
        _point("tall", candidate("tall_masks"), 0.95),  # per task: never the winner
        _point("ties", candidate("ties", density=0.2), 0.82),
    ]
    selection = select(points)
    assert {f: p.candidate.label for f, p in selection.family_best.items()} == {
        "cart": "cart rank_ratio=0.2 scale=1.0",
        "tall": "tall_masks",
        "ties": "ties density=0.2",
    }
    assert selection.winner is points[1]
    with pytest.raises(ValueError, match="one model per task"):
        select(points[2:3])


def test_compare_keeps_kinds_and_normalizes_by_the_finetuned_models():
    scores = {
        "finetuned": {"a": 0.9, "b": 0.8},
        "cart": {"a": 0.45, "b": 0.8},
        "fisher": {"a": 0.9, "b": 0.4},
    }
    kinds = {"finetuned": "reference", "cart": "data-free", "fisher": "data-aware"}
    comparison = compare(kinds, scores, {"fisher": {"samples": 8}})
    assert comparison["cart"]["normalized"] == {"a": 0.5, "b": 1.0}
    assert comparison["cart"]["mean_normalized"] == pytest.approx(0.75)
    assert comparison["fisher"]["kind"] == "data-aware"
    assert comparison["fisher"]["adaptation"] == {"samples": 8}
    assert "adaptation" not in comparison["cart"]
    without = compare({"cart": "data-free"}, {"cart": scores["cart"]})
    assert math.isnan(without["cart"]["mean_normalized"])
    with pytest.raises(ValueError, match="unknown report kind"):
        compare({"cart": "merged"}, {"cart": scores["cart"]})
    text = markdown(
        "planned",
        ["a", "b"],
        "cart",
        {"version": "3", "aliases": ["challenger"], "reused": True},
        comparison,
        {"charts/per_task_bars.png": "/tmp/x.png"},
    )
    rows = [line for line in text.splitlines() if line.startswith("| ") and "kind" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| finetuned", "| fisher", "| cart"]
    assert "**Version 3** (challenger, already registered: no new version): cart" in text
    assert "[per task bars](charts/per_task_bars.png)" in text


def test_a_per_task_reference_without_its_task_is_refused(tiny_run):
    run, _ = tiny_run
    with pytest.raises(Exception, match="one model per task"):
        reference("finetuned").state(run)
