"""The merge pipeline end to end on a reduced zoo: S3 (moto server), Prefect, MLflow."""

import io
import json
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from conftest import ZOO_TASKS as TASKS
from conftest import candidate, planned, run_of
from PIL import Image

from mergeflow import report
from mergeflow.candidates import DataAware, FixedMethod, cart_point
from mergeflow.evaluation import EvaluationContext
from mergeflow.models import image_transform
from mergeflow.run import load_index
from zoo.zoo import ZooConfig, build_zoo, upload_zoo, zoo_spec


def test_zoo_build_is_reused(zoo):
    folder, manifest = zoo
    assert [t["name"] for t in manifest["tasks"]] == list(TASKS)
    again = build_zoo(folder, ZooConfig(**manifest["config"]), say=lambda line: None)
    assert again["built_at"] == manifest["built_at"]


def test_pipeline_registers_a_champion_that_classifies(
    prefect_harness, zoo, bucket, tracking, tmp_path, capfd
):
    from flows.merge_pipeline import merge_pipeline
    from mergeflow.models import classify

    folder, manifest = zoo
    prefix = f"s3://{bucket}/zoo"
    assert upload_zoo(folder, prefix) > 0
    spec = zoo_spec(
        manifest,
        prefix,
        "zoo-test",
        rank_ratios=(0.1, 0.5),
        scales=(1.0, 2.0),
        families=[{"method": "ties", "search": {"scale": [0.5, 1.0]}}],
        baselines=[
            "average",
            "task_arithmetic",
            "zeroshot",
            "finetuned",
            "tall_masks",
            {"method": "regmean", "params": {"samples": 16}},
            {"method": "adamerging", "params": {"steps": 3, "samples": 16}},
            {"method": "twin_merging", "label": "twin", "params": {"epochs": 20, "samples": 16}},
        ],
        compression={"rank_ratio": 0.25, "register_model": True},
    )
    cache_dir = str(tmp_path / "cache")
    result = merge_pipeline(spec, cache_dir=cache_dir)

    assert len(result["grid"]) == 6
    assert {p["family"] for p in result["grid"]} == {"cart", "ties"}
    best = result["best"]
    comparison = result["comparison"]
    assert {
        "average",
        "task_arithmetic",
        "zeroshot",
        "finetuned",
        "tall_masks",
        "cart_indexed rank_ratio=0.25",
        "regmean samples=16",
        "adamerging samples=16 steps=3",
        "twin",
        best["label"],
        *result["family_best"].values(),
    } == set(comparison)
    kinds = {name: summary["kind"] for name, summary in comparison.items()}
    assert kinds["finetuned"] == kinds["zeroshot"] == "reference"
    assert kinds["regmean samples=16"] == kinds["adamerging samples=16 steps=3"] == "data-aware"
    assert kinds["average"] == kinds[best["label"]] == "data-free"
    assert kinds["tall_masks"] == kinds["cart_indexed rank_ratio=0.25"] == "per-task"
    learned = comparison["adamerging samples=16 steps=3"]["adaptation"]["coefficients"]
    assert set(learned) == set(TASKS)
    by_label = {p["label"]: p["mean_normalized"] for p in result["grid"]}
    for family, label in result["family_best"].items():
        same_family = [p["mean_normalized"] for p in result["grid"] if p["family"] == family]
        assert by_label[label] == max(same_family)
    # the winner is the best family's best, unless the selection images cannot tell it
    # from one the tie rule prefers (CART); either way it is compared with the other and
    # with weight averaging, with 95% intervals
    selection = result["selection"]
    assert selection["winner"] == best["label"] in result["family_best"].values()
    top = max(result["family_best"].values(), key=by_label.get)
    runner_up = selection["runner_up"]
    if selection["by_tie_rule"]:
        assert runner_up["other"] == top and not runner_up["distinguishable"]
        assert best["method"] == "cart"
    else:
        assert by_label[best["label"]] == by_label[top]
        assert runner_up["other"] in result["family_best"].values()
    low, high = runner_up["interval"]
    assert low <= runner_up["difference"] <= high
    assert selection["versus_average"]["other"] == "weight averaging"
    # report accuracies carry Wilson intervals over their images
    for summary in comparison.values():
        for task, (low, high) in summary["interval"].items():
            assert low <= summary["accuracy"][task] <= high

    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("zoo-test", "champion")
    assert str(champion.version) == result["registration"]["version"] == "1"
    assert champion.tags["method"] == best["method"]
    assert json.loads(champion.tags["params"]) == best["params"]
    assert len(champion.tags["source.base.sha256"]) == 64
    assert champion.tags["source.shapes.uri"] == f"{prefix}/checkpoints/shapes.safetensors"
    run = client.get_run(champion.run_id)
    assert run.data.params["method"] == best["method"]
    for task in TASKS:
        assert f"report_accuracy.{task}" in run.data.metrics
    nested = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(nested) == 6

    # the model loaded by alias classifies as the merged weights do
    model = mlflow.pyfunc.load_model("models:/zoo-test@champion")
    from datasets import Dataset

    rows = []
    for task in TASKS:
        data = Dataset.from_parquet(str(folder / "data" / task / "test.parquet")).select(range(8))
        rows += [
            {"task": task, "image": r["image"]}
            for r in data.cast_column("image", data.features["image"].__class__(decode=False))
        ]
    frame = pd.DataFrame(
        {"task": [r["task"] for r in rows], "image": [r["image"]["bytes"] for r in rows]}
    )
    predicted = model.predict(frame)

    run = run_of(spec, cache_dir)
    context = run.context
    merged = planned(spec, best["label"]).state(run)
    transform = image_transform(context.model)

    def expected_labels(state_of_task):
        expected = []
        for task in TASKS:
            context.model.load_state_dict(state_of_task(task))
            head = next(t.head for t in context.tasks if t.name == task)
            images = torch.stack(
                [transform(Image.open(io.BytesIO(b))) for b in frame[frame.task == task]["image"]]
            )
            with torch.no_grad():
                expected += classify(context.model, head, images).argmax(1).tolist()
        return expected

    assert predicted["label_index"].tolist() == expected_labels(lambda task: merged)

    # the CART index is one registered model that rebuilds the weights of the task asked for
    compression = result["compression"]
    assert compression["index_bytes"] < compression["checkpoint_bytes"]
    indexed = mlflow.pyfunc.load_model("models:/zoo-test-indexed@champion")
    index = load_index(compression["path"])
    rebuilt = indexed.predict(frame)["label_index"].tolist()
    assert rebuilt == expected_labels(lambda task: index.rebuild(task, "cpu"))

    # Twin-Merging is its own kind, registered as a model that routes each image itself
    twin = result["comparison"]["twin"]
    assert twin["kind"] == "routed"
    assert result["routed"]["registration"]["name"] == "zoo-test-routed"
    text = report.text(result)
    assert "registered twin: models:/zoo-test-routed/1" in text
    (routed_line,) = report.routed_lines(result["comparison"])
    assert routed_line.startswith("twin: the router names the task of ")
    assert "of held-out images; stored in" in routed_line and f"routed: {routed_line}" in text
    routed = mlflow.pyfunc.load_model("models:/zoo-test-routed@champion")
    untold = routed.predict(frame.drop(columns="task"))
    assert set(untold["task"]) <= set(TASKS)
    told = routed.predict(frame)
    assert told["task"].tolist() == frame["task"].tolist()
    from mergeflow.twin import load_twin

    twin_file = planned(spec, "twin").adapted(run)[1]
    routed_model = load_twin(twin_file, context.model, context.base)
    expected = []
    for task in TASKS:
        head = next(t.head for t in context.tasks if t.name == task)
        images = torch.stack(
            [transform(Image.open(io.BytesIO(b))) for b in frame[frame.task == task]["image"]]
        )
        expected += routed_model.logits(images, head).argmax(1).tolist()
    assert told["label_index"].tolist() == expected
    agree = untold["task"] == frame["task"]
    assert (untold["label_index"][agree] == told["label_index"][agree]).all()

    # lineage: the spec, the code and the Prefect run that made it
    assert champion.tags["mergeflow.spec_digest"] == spec.digest()
    assert champion.tags["mergeflow.code_version"].startswith("0.1.0")
    flow_run_id = champion.tags["prefect.flow_run_id"]
    assert len(flow_run_id) == 36
    # charts are logged with the run and linked from the report
    artifacts = {a.path for a in client.list_artifacts(champion.run_id, "charts")}
    assert artifacts == {
        "charts/accuracy_vs_rank.png",
        "charts/per_task_heatmap.png",
        "charts/per_task_bars.png",
        "charts/per_task_radar.png",
    }
    for path in result["charts"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second run of the same spec recomputes nothing (no SVD, no merge, no score) and
    # makes no new version
    from mergeflow.cart_grid import CartFactors
    from mergeflow.cart_index import CartIndex

    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed on a re-run of the same spec")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CartFactors, "factorize", must_not_run)
        patch.setattr(EvaluationContext, "judge", must_not_run)
        patch.setattr(FixedMethod, "weights", must_not_run)
        patch.setattr(DataAware, "_adapt", must_not_run)
        patch.setattr(CartIndex, "build", must_not_run)
        again = merge_pipeline(spec, cache_dir=cache_dir)
    assert again["registration"]["version"] == "1"
    assert again["registration"]["reused"] is True
    assert again["comparison"] == comparison
    assert again["selection"] == selection
    # what the terminal shows: the table with intervals, the choice, the reuse, the stores
    assert all(u["computed"] == 0 for u in again["store_usage"].values())
    assert again["store_usage"]["scores"]["reused"] >= len(result["grid"])
    printed = report.text(again)
    assert "95% interval" in printed and f"chosen: {selection['why']}" in printed
    assert "computed nothing" in printed
    assert "(champion; already registered, no new version)" in printed
    assert f"tracking {tracking}" in printed
    assert json.loads(report.json_document(again))["selection"]["winner"] == best["label"]
    # `mergeflow run --json` of the same spec: one JSON document on stdout, nothing made
    from mergeflow.cli import main

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    earlier = capfd.readouterr()
    assert main(["run", str(spec_file), "--json", "--cache-dir", cache_dir]) == 0
    printed = capfd.readouterr()
    document = json.loads(printed.out)
    assert document["registration"]["reused"] is True
    assert document["selection"] == selection
    assert document["comparison"][best["label"]]["mean_interval"] == pytest.approx(
        comparison[best["label"]]["mean_interval"]
    )
    assert len(client.search_model_versions("name='zoo-test'")) == 1
    assert os.environ["MLFLOW_TRACKING_URI"] == tracking

    # no credential reached the logs, the flow runs' parameters, the artifacts or MLflow
    secrets = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]]
    rest = capfd.readouterr()
    seen = type(rest)(earlier.out + printed.out + rest.out, earlier.err + printed.err + rest.err)
    assert_no_secrets(secrets, seen, client, tmp_path)


def assert_no_secrets(secrets, captured, client, tmp_path):
    from prefect.client.orchestration import get_client

    texts = {"stdout": captured.out, "stderr": captured.err}
    with get_client(sync_client=True) as prefect:
        for run in prefect.read_flow_runs():
            texts[f"flow run {run.name} parameters"] = json.dumps(run.parameters, default=str)
        for artifact in prefect.read_artifacts():
            texts[f"artifact {artifact.key}"] = json.dumps(artifact.data, default=str)
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            texts[f"mlflow run {run.info.run_id}"] = json.dumps(
                [run.data.params, run.data.tags], default=str
            )
            folder = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, dst_path=str(tmp_path / "scan" / run.info.run_id)
            )
            for path in Path(folder).rglob("*"):  # every file, weights and charts included
                if path.is_file():
                    texts[f"artifact file {path.name}"] = path.read_bytes().decode("latin-1")
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name='{model.name}'"):
            texts[f"model version {model.name}/{version.version}"] = json.dumps(version.tags)
    assert len(texts) > 10
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a credential appears in {where}"


def test_selection_prefers_best_then_cart_then_smaller_rank():
    from mergeflow.selection import GridPoint, pick_best

    def point(candidate, score):
        return GridPoint(candidate.method, candidate, {"mean_normalized": score})

    grid = [
        point(cart_point(0.1, 1.0), 0.8),
        point(cart_point(0.2, 1.0), 0.9),
        point(candidate("ties", scale=0.5), 0.9),
        point(cart_point(0.05, 2.0), 0.9),
        point(cart_point(0.05, 1.0), 0.9),
    ]
    assert pick_best(grid) == grid[4]
    assert pick_best(grid[:3]) == grid[1]
    grid.append(point(candidate("ties", scale=1.0), 0.91))
    assert pick_best(grid) == grid[-1]
