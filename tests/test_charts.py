"""The run's charts stay readable however many models a spec compares: each PNG is opened
and measured."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from mergeflow import charts

TASKS = ("mnist", "svhn", "eurosat", "gtsrb", "dtd", "resisc45", "sun397", "cars")


def _comparison(num_models: int) -> dict:
    rng = random.Random(0)
    kinds = ["data-free", "data-aware", "per-task"]
    comparison = {}
    for i in range(num_models):
        accuracy = {t: rng.uniform(0.1, 0.9) for t in TASKS}
        label = f"method{i} with a long parameter list density=0.{i} scale=1.{i} center=average"
        comparison[label] = {
            "accuracy": accuracy,
            "mean_accuracy": sum(accuracy.values()) / len(TASKS),
            "kind": kinds[i % 3],
        }
    for name, level in (("finetuned", 0.95), ("zeroshot", 0.2)):
        accuracy = dict.fromkeys(TASKS, level)
        comparison[name] = {"accuracy": accuracy, "mean_accuracy": level, "kind": "reference"}
    return comparison


@pytest.mark.parametrize("num_models", [3, 23])
def test_report_charts_stay_under_2000_px_and_show_every_model_or_each_kinds_best(
    tmp_path, num_models
):
    comparison = _comparison(num_models)
    heatmap = Image.open(charts.per_task_heatmap(comparison, tmp_path / "heatmap.png"))
    bars = Image.open(charts.per_task_bars(comparison, tmp_path / "bars.png"))
    radar = Image.open(charts.per_task_radar(comparison, tmp_path / "radar.png"))
    for image in (heatmap, bars, radar):
        assert image.format == "PNG"
        assert image.width < charts.MAX_WIDTH_PX, image.size
    # the heatmap grows a row per model, not a column: every model is on it
    assert heatmap.height > 0.3 * charts.DPI * len(comparison)
    # it is not blank: a high and a low cell differ in colour
    assert len(heatmap.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def test_bars_show_the_best_of_each_kind_and_the_references():
    comparison = _comparison(23)
    shown = charts.best_of_each_kind(comparison)
    assert list(shown)[-2:] == ["finetuned", "zeroshot"]
    assert len(shown) == 5  # data-free, data-aware, per-task, two references
    for label, summary in shown.items():
        if summary["kind"] != "reference":
            same_kind = [
                s["mean_accuracy"] for s in comparison.values() if s["kind"] == summary["kind"]
            ]
            assert summary["mean_accuracy"] == max(same_kind), label


def test_bars_carry_the_reports_intervals_as_error_bars(tmp_path):
    from mergeflow.report import compare

    scores = {"finetuned": {"a": 0.9, "b": 0.8}, "cart": {"a": 0.6, "b": 0.5}}
    comparison = compare(
        {"finetuned": "reference", "cart": "data-free"}, scores, sizes={"a": 50, "b": 400}
    )
    summary = comparison["cart"]
    values = [60.0, 50.0, 55.0]
    below, above = charts._error_bars(summary, ["a", "b"], values)
    # fewer images, wider interval: task a's bar (50 images) has the longer whiskers
    assert below[0] > below[1] > 0 and above[0] > above[1] > 0
    assert below[2] == pytest.approx(55.0 - 100 * summary["mean_interval"][0])
    assert (
        charts._error_bars(
            compare({"cart": "data-free"}, {"cart": scores["cart"]})["cart"], ["a", "b"], values
        )
        is None
    )
    path = charts.per_task_bars(comparison, tmp_path / "bars.png")
    assert Image.open(path).size[0] < charts.MAX_WIDTH_PX
