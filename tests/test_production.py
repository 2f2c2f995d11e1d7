"""Production behaviour: the registry's lifecycle (idempotent registration, the promotion
gate), the shared result store, re-runs and resumed runs that recompute nothing, the
promote flow and `mergeflow score-model`, and the Dask run against the local one.

Real parts throughout: moto's S3 server, MLflow on SQLite, Prefect's test API, the zoo.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import planned, run_of, tiny_tower_state

from mergeflow import pipeline, registry
from mergeflow.candidates import DataAware, FixedMethod
from mergeflow.evaluation import EvaluationContext
from mergeflow.results import STORE_VARIABLE, ResultStore
from mergeflow.storage import CheckpointCache

ROOT = Path(__file__).resolve().parent.parent


# --- the registry's lifecycle -------------------------------------------------------------


def _register(name, score, key, data, rescore=None, weights=None):
    mlflow.set_experiment("registry-lifecycle")  # not whatever an earlier test left active
    files = registry.ModelFiles(
        "mergeflow-tiny-vit",
        heads={"a": torch.randn(2, 16)},
        classes={"a": ("x", "y")},
        weights=tiny_tower_state() if weights is None else weights,
    )
    return registry.register_model(name, files, registry.Gate(score, data, rescore), key)


def test_registration_is_idempotent_and_champion_moves_only_on_the_same_data(tracking):
    client = mlflow.MlflowClient()

    def champion():
        return str(client.get_model_version_by_alias("m", "champion").version)

    first = _register("m", 0.5, "k1", "data-1")
    assert (first.version, first.aliases, first.reused) == ("1", ("champion",), False)

    # a retried or repeated registration of the same model makes no second version
    again = _register("m", 0.9, "k1", "data-1")
    assert (again.version, again.aliases, again.reused) == ("1", ("champion",), True)
    assert len(client.search_model_versions("name='m'")) == 1

    # a worse model on the same data is a challenger; the champion stays
    worse = _register("m", 0.4, "k2", "data-1")
    assert (worse.version, worse.aliases, worse.previous_champion) == ("2", ("challenger",), "1")
    assert champion() == "1"

    # a higher score on other data does not count: the champion is rescored on that data
    asked = []

    def rescore(uri):
        asked.append(uri)
        return 0.8

    other_data = _register("m", 0.7, "k3", "data-2", rescore=rescore)
    assert other_data.aliases == ("challenger",)
    assert asked == ["models:/m/1"]
    assert champion() == "1"

    # ... and when it cannot be rescored, the champion stays
    unverifiable = _register("m", 0.99, "k4", "data-3")
    assert unverifiable.aliases == ("challenger",)
    assert champion() == "1"

    # an equal score on the same data is no better: the champion stays
    tied = _register("m", 0.5, "k5", "data-1")
    assert tied.aliases == ("challenger",)
    assert champion() == "1"

    # a champion scored on other data whose rescoring fails stays, however high the new score
    def broken(uri):
        raise RuntimeError("its weights are gone")

    unreadable = _register("m", 0.99, "k6", "data-4", rescore=broken)
    assert unreadable.aliases == ("challenger",)
    assert champion() == "1"

    # a better model on the same data takes champion
    better = _register("m", 0.6, "k7", "data-1")
    assert (better.version, better.aliases, better.previous_champion) == (
        "7",
        ("champion",),
        "1",
    )
    assert champion() == "7"
    tags = client.get_model_version("m", "7").tags
    assert tags[registry.REPORT_DATA_TAG] == "data-1"
    assert float(tags[registry.SCORE_TAG]) == 0.6


def test_promoting_takes_a_strictly_higher_score(tracking):
    client = mlflow.MlflowClient()
    _register("p", 0.5, "p1", "data-1")
    _register("p", 0.4, "p2", "data-1")
    assert registry.promote(client, "p", "2", 0.5, 0.5) is False  # a tie is not better
    assert str(client.get_model_version_by_alias("p", "champion").version) == "1"
    assert registry.promote(client, "p", "2", 0.5001, 0.5) is True
    assert str(client.get_model_version_by_alias("p", "champion").version) == "2"


def test_versions_resolve_by_alias_and_number_and_load_as_registered(tracking):
    from mergeflow.models import create_model

    torch.manual_seed(5)
    expected = {k: v.clone() for k, v in create_model("mergeflow-tiny-vit").state_dict().items()}
    _register("r", 0.5, "r1", "data-1", weights=expected)
    _register("r", 0.4, "r2", "data-1")
    assert registry.resolve_version("r", "champion") == "1"
    assert registry.resolve_version("r", "challenger") == "2"
    assert registry.resolve_version("r", "2") == "2"
    assert registry.resolve_version("r", "no-such-alias", missing_ok=True) is None
    with pytest.raises(LookupError, match="registered model 'r' has no version '9'"):
        registry.resolve_version("r", "9")
    model = registry.load_registered_model("models:/r@champion")
    weights = model.model.state_dict()
    assert weights.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], msg=key)
    assert model.classes == {"a": ("x", "y")}


def test_a_registration_interrupted_before_its_aliases_is_completed_by_the_retry(tracking):
    client = mlflow.MlflowClient()
    _register("m", 0.5, "k1", "data-1")
    source = client.get_model_version("m", "1").source
    # an attempt that registered version 2 and died before it set any alias
    mlflow.register_model(
        source,
        "m",
        tags={
            registry.REGISTRATION_KEY_TAG: "k2",
            registry.SCORE_TAG: "0.7",
            registry.REPORT_DATA_TAG: "data-1",
        },
    )
    retry = _register("m", 0.7, "k2", "data-1")
    assert (retry.version, retry.aliases, retry.reused) == ("2", ("champion",), True)
    assert len(client.search_model_versions("name='m'")) == 2


# --- pipeline runs on the zoo ---------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_prefix(zoo, s3_endpoint):
    import boto3

    from zoo.zoo import upload_zoo

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="mf-production")
    folder, manifest = zoo
    prefix = "s3://mf-production/zoo"
    upload_zoo(folder, prefix)
    return prefix, manifest


def _spec(zoo_prefix, name, **overrides):
    from zoo.zoo import zoo_spec

    prefix, manifest = zoo_prefix
    settings = {
        "rank_ratios": (0.1, 0.3, 0.5),
        "scales": (1.0, 2.0),
        "baselines": ["average", "finetuned"],
        **overrides,
    }
    return zoo_spec(manifest, prefix, name, **settings)


def _scores_of(result):
    grid = {p["label"]: p["accuracy"] for p in result["grid"]}
    report = {name: s["accuracy"] for name, s in result["comparison"].items()}
    return grid, report


class _Counter:
    """Counts calls of EvaluationContext.judge (every forward pass over a split)."""

    def __init__(self, patch):
        self.calls = 0
        original = EvaluationContext.judge

        def counted(context, *args, **kwargs):
            self.calls += 1
            return original(context, *args, **kwargs)

        patch.setattr(EvaluationContext, "judge", counted)


@pytest.mark.full
def test_result_store_on_s3_is_shared_by_workers_with_empty_caches(
    prefect_harness, zoo_prefix, tracking, tmp_path, monkeypatch
):
    from flows.merge_pipeline import merge_pipeline
    from mergeflow.cart_grid import CartFactors

    monkeypatch.setenv(STORE_VARIABLE, "s3://mf-production/results")
    spec = _spec(zoo_prefix, "shared-store")
    first = merge_pipeline(spec, cache_dir=str(tmp_path / "worker-a"))
    store = ResultStore(CheckpointCache(tmp_path / "worker-b"))
    assert store.remote and store.root == "s3://mf-production/results"
    assert len(store.records("scores")) > 6
    assert store.has_file("factors", Path(_factors_path(spec, tmp_path / "worker-a")).name)

    # a second worker with an empty local cache finds everything in the store
    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed what the shared store holds")

    monkeypatch.setattr(CartFactors, "factorize", must_not_run)
    monkeypatch.setattr(EvaluationContext, "judge", must_not_run)
    monkeypatch.setattr(FixedMethod, "weights", must_not_run)
    second = merge_pipeline(spec, cache_dir=str(tmp_path / "worker-b"))
    assert _scores_of(second) == _scores_of(first)
    assert second["registration"]["version"] == first["registration"]["version"] == "1"
    assert second["registration"]["reused"] is True


@pytest.mark.full
def test_gpu_part_leaves_the_data_aware_merges_to_the_pipeline(
    prefect_harness, zoo_prefix, tracking, tmp_path, monkeypatch
):
    """What the GPU deployment runs (factors, every data-aware merge: baselines and family
    points) is in the shared store; the pipeline on another worker then redoes none of it."""
    from flows.merge_pipeline import merge_pipeline
    from flows.scheduled import gpu_steps
    from mergeflow.cart_grid import CartFactors

    monkeypatch.setenv(STORE_VARIABLE, "s3://mf-production/gpu-part")
    quick = {"steps": 2, "samples": 8, "batch_size": 4}
    spec = _spec(
        zoo_prefix,
        "gpu-part",
        baselines=["average", "finetuned", {"method": "fisher", "params": {"samples": 8}}],
        families=[{"method": "adamerging", "params": quick, "search": {"init": [0.2, 0.4]}}],
    )
    gpu = gpu_steps(spec, str(tmp_path / "gpu-worker"))
    assert len(gpu["adapted"]) == 3
    store = ResultStore(CheckpointCache(tmp_path / "cpu-worker"))
    for uri in gpu["adapted"]:
        assert uri.startswith("s3://mf-production/gpu-part/adapted/")
        assert store.has_file("adapted", uri.rsplit("/", 1)[1])

    def must_not_run(*args, **kwargs):
        raise AssertionError("the pipeline redid the GPU part")

    monkeypatch.setattr(CartFactors, "factorize", must_not_run)
    monkeypatch.setattr(DataAware, "_adapt", must_not_run)
    result = merge_pipeline(spec, cache_dir=str(tmp_path / "cpu-worker"))
    adamerging_points = [p for p in result["grid"] if p["method"] == "adamerging"]
    assert len(adamerging_points) == 2
    kinds = {s["kind"] for s in result["comparison"].values()}
    assert "data-aware" in kinds
    fisher = next(s for name, s in result["comparison"].items() if name.startswith("fisher"))
    assert fisher["kind"] == "data-aware" and fisher["adaptation"]["fisher_mass"]


def _factors_path(spec, cache_dir):
    return run_of(spec, cache_dir).factors_path()


@pytest.mark.full
def test_promote_flow_and_score_model_on_the_registry(
    prefect_harness, zoo_prefix, tracking, tmp_path, capsys
):
    from flows.merge_pipeline import merge_pipeline
    from flows.promote import promote
    from mergeflow.cli import main

    spec = _spec(zoo_prefix, "promoted")
    cache_dir = str(tmp_path / "cache")
    result = merge_pipeline(spec, cache_dir=cache_dir)
    winner = result["comparison"][result["best"]["label"]]

    # `mergeflow score-model` loads the champion from the registry and scores it: the same
    # accuracy the pipeline recorded for it
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    capsys.readouterr()
    assert (
        main(
            [
                "score-model",
                "models:/promoted@champion",
                "--spec",
                str(spec_file),
                "--cache-dir",
                cache_dir,
            ]
        )
        == 0
    )
    mean_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert mean_line.split()[:3] == ["mean", "accuracy", f"{winner['mean_accuracy']:.4f}"]

    # a broken model (its image projection zeroed) as version 2, registered as challenger
    run = run_of(spec, cache_dir)
    broken = dict(planned(spec, result["best"]["label"]).state(run))
    broken["visual.proj"] = torch.zeros_like(broken["visual.proj"])
    files = registry.ModelFiles(spec.model, run.context.heads, run.context.classes, broken)
    registry.register_model("promoted", files, registry.Gate(-1.0, "elsewhere"), "broken")
    kept = promote(spec, cache_dir=cache_dir)
    assert kept["version"] == "2" and kept["previous_champion"] == "1"
    # the gate's two scores are each model's own, taken on the spec's report data ...
    from mergeflow.tracking import score_of

    def scored(version):
        scores = pipeline.registered_model_scores(run, f"models:/promoted/{version}")
        return score_of(pipeline.summary_of(run, scores))

    assert kept["score"] == pytest.approx(scored(2))
    assert kept["champion_score"] == pytest.approx(scored(1))
    assert kept["score"] != kept["champion_score"]
    # ... and champion went to the strictly higher one
    client = mlflow.MlflowClient()
    champion = str(client.get_model_version_by_alias("promoted", "champion").version)
    assert kept["promoted"] == (kept["score"] > kept["champion_score"])
    assert champion == ("2" if kept["promoted"] else "1")

    # hand champion to the worse one by hand, then promote the better one: the gate moves it
    better = champion
    worse = "1" if better == "2" else "2"
    client.set_registered_model_alias("promoted", "champion", worse)
    back = promote(spec, version=better, cache_dir=cache_dir)
    assert back["promoted"] is True
    assert str(client.get_model_version_by_alias("promoted", "champion").version) == better


@pytest.mark.full
def test_dask_run_equals_the_local_run(prefect_harness, zoo_prefix, tracking, tmp_path):
    from flows.dask_pipeline import on_dask
    from flows.merge_pipeline import merge_pipeline

    spec = _spec(
        zoo_prefix,
        "on-dask",
        families=[{"method": "ties", "search": {"scale": [0.5, 1.0]}}],
        baselines=["average", "finetuned", "tall_masks"],
    )
    with pytest.MonkeyPatch.context() as patch:
        local_counter = _Counter(patch)
        local = merge_pipeline(spec, cache_dir=str(tmp_path / "local"))
    with pytest.MonkeyPatch.context() as patch:
        in_flow_process = _Counter(patch)
        distributed = on_dask()(spec, cache_dir=str(tmp_path / "dask"))
    # the grid and the report were scored by the Dask workers (other processes); the flow
    # process itself scored only the fine-tuned references it normalizes by and (for the
    # winner's paired comparison, in the select step) weight averaging on the selection
    assert in_flow_process.calls == len(spec.tasks) + 1 < local_counter.calls
    assert _scores_of(distributed) == _scores_of(local)
    assert distributed["best"] == local["best"]
    # the same model: the second registration finds the first
    assert distributed["registration"]["reused"] is True


def test_concurrent_registrations_of_one_model_keep_one_version(tracking):
    from concurrent.futures import ThreadPoolExecutor

    mlflow.set_experiment("registry-lifecycle")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: _register("m", 0.5, "k1", "data-1"), range(2)))
    client = mlflow.MlflowClient()
    assert len(client.search_model_versions("name='m'")) == 1
    assert {r.version for r in results} == {"1"}
    assert client.get_registered_model("m").aliases == {"champion": 1}


def test_the_registered_model_states_its_signature_and_takes_each_image_form(tracking, caplog):
    import io
    import warnings

    import numpy as np
    import pandas as pd
    from PIL import Image

    from mergeflow.models import create_model

    mlflow.set_experiment("registry-lifecycle")
    files = registry.ModelFiles(
        "mergeflow-tiny-vit",
        heads={"a": torch.nn.functional.normalize(torch.randn(2, 64), dim=-1)},
        classes={"a": ("x", "y")},
        weights=create_model("mergeflow-tiny-vit").state_dict(),
    )
    with caplog.at_level("WARNING", logger="mlflow"), warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        registry.register_model("s", files, registry.Gate(0.5, "data-1"), "s1")
    assert "signature" not in caplog.text  # given, not inferred (MLflow warns otherwise)
    from_logging = [
        str(w.message) for w in shown if "mlflow" in w.filename and "pyfunc" in w.filename
    ]
    assert not from_logging, from_logging  # no type-hint or input-example warning
    model = mlflow.pyfunc.load_model("models:/s@champion")
    signature = model.metadata.get_input_schema().input_names()
    assert signature == ["task", "image"]
    assert model.metadata.get_output_schema().input_names() == ["label_index", "label"]

    pixels = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    encoded = buffer.getvalue()
    frame = pd.DataFrame({"task": ["a"] * 3, "image": [encoded, {"bytes": encoded}, pixels]})
    predicted = model.predict(frame)
    assert predicted["label_index"].nunique() == 1  # one image in three forms, one answer
    assert set(predicted["label"]) <= {"x", "y"}
