"""The arrivals flow under Prefect's harness: checkpoints uploaded one by one to the test
S3 server (moto), each run taking in what is new, MLflow on SQLite for the registry."""

from __future__ import annotations

import pytest

from mergeflow.errors import ParameterError


@pytest.fixture(scope="module")
def landing_zoo(zoo, s3_endpoint):
    import boto3

    from zoo.zoo import upload_zoo

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="mf-arrivals")
    folder, manifest = zoo
    upload_zoo(folder, "s3://mf-arrivals/zoo")
    return folder, manifest


def land(folder, task: str, landing: str) -> str:
    """Upload one fine-tuned checkpoint of the zoo under the landing prefix."""
    from mergeflow.storage import filesystem

    fs, root = filesystem(landing)
    fs.put_file(str(folder / "checkpoints" / f"{task}.safetensors"), f"{root}{task}.safetensors")
    return f"{landing}{task}.safetensors"


def count_folds(monkeypatch) -> list:
    """A list that grows by one with every fold the arrivals module makes."""
    from mergeflow import arrivals, continual

    folds = []

    def counted(*args, **kwargs):
        folds.append(1)
        return continual.fold_in(*args, **kwargs)

    monkeypatch.setattr(arrivals, "fold_in", counted)
    return folds


def versions(name: str) -> list:
    import mlflow

    return mlflow.MlflowClient().search_model_versions(f"name = '{name}'")


def test_checkpoints_are_taken_in_as_they_land(
    prefect_harness, landing_zoo, tracking, tmp_path, monkeypatch
):
    import mlflow

    from flows.arrivals import merge_arrivals
    from zoo.zoo import arrivals_spec

    folder, manifest = landing_zoo
    landing = "s3://mf-arrivals/finetuned/"
    spec = arrivals_spec(manifest, "s3://mf-arrivals/zoo", landing, "arrivals", device="cpu")
    cache = str(tmp_path / "cache")
    folds = count_folds(monkeypatch)
    tasks = [t["name"] for t in manifest["tasks"]]

    from mergeflow.arrivals import find_landed
    from mergeflow.storage import filesystem

    fs, root = filesystem(landing)
    with fs.open(f"{root}notes.txt", "w") as f:
        f.write("not a checkpoint")
    assert find_landed(spec) == ([], [f"{landing}notes.txt"])  # names no task: left alone
    assert merge_arrivals(spec, cache_dir=cache)["new"] == []  # nothing has landed yet
    land(folder, tasks[0], landing)
    first = merge_arrivals(spec, cache_dir=cache)
    assert first["new"] == [tasks[0]] and first["version"] is None and len(folds) == 1
    land(folder, tasks[1], landing)
    second = merge_arrivals(spec, cache_dir=cache)
    assert second["taken_in"] == tasks[:2] and len(folds) == 2
    assert second["version"] == "1" and "champion" in second["registration"]["aliases"]
    assert set(second["scores"]) == set(tasks[:2])

    # the third arrival's run dies after its fold: the re-run finds the fold done
    land(folder, tasks[2], landing)
    import flows.arrivals as flow_module

    real_register = flow_module.register_arrivals

    def unreachable(*args, **kwargs):
        raise ConnectionError("the tracking server is down")

    monkeypatch.setattr(flow_module, "register_arrivals", unreachable)
    with pytest.raises(ConnectionError):
        merge_arrivals(spec, cache_dir=cache)
    assert len(folds) == 3 and len(versions("arrivals")) == 1
    monkeypatch.setattr(flow_module, "register_arrivals", real_register)
    third = merge_arrivals(spec, cache_dir=cache)
    assert third["new"] == [tasks[2]] and len(folds) == 3  # resumed: not folded again
    assert third["version"] == "2" and set(third["scores"]) == set(tasks)
    version = mlflow.MlflowClient().get_model_version("arrivals", "2")
    assert version.tags["mergeflow.arrivals.order"] == ",".join(tasks)
    assert version.tags["mergeflow.arrivals.count"] == "3"
    assert version.tags["method"] == "continual opcm"

    again = merge_arrivals(spec, cache_dir=cache)  # nothing new: nothing done
    assert again["new"] == [] and again["version"] == "2"
    assert len(folds) == 3 and len(versions("arrivals")) == 2


def test_a_task_cannot_arrive_twice_with_other_weights(
    prefect_harness, landing_zoo, tracking, tmp_path
):
    from flows.arrivals import merge_arrivals
    from mergeflow.storage import filesystem
    from zoo.zoo import arrivals_spec

    folder, manifest = landing_zoo
    landing = "s3://mf-arrivals/twice/"
    spec = arrivals_spec(manifest, "s3://mf-arrivals/zoo", landing, "twice", device="cpu",
                         method="average")  # fmt: skip
    tasks = [t["name"] for t in manifest["tasks"]]
    land(folder, tasks[0], landing)
    merge_arrivals(spec, cache_dir=str(tmp_path / "cache"))
    fs, root = filesystem(landing)  # another task's weights under the first task's name
    fs.put_file(str(folder / "checkpoints" / f"{tasks[1]}.safetensors"),
                f"{root}{tasks[0]}.safetensors")  # fmt: skip
    with pytest.raises(ParameterError, match=f"task '{tasks[0]}' was merged in already"):
        merge_arrivals(spec, cache_dir=str(tmp_path / "cache"))


def test_an_arrivals_spec_names_the_field_at_fault(landing_zoo):
    from zoo.zoo import arrivals_spec

    _, manifest = landing_zoo
    with pytest.raises(ParameterError, match="unknown continual method 'tsv_m'"):
        arrivals_spec(manifest, "s3://x/zoo", "s3://x/in/", "bad", method="tsv_m")
    with pytest.raises(ParameterError, match="method 'opcm' has no parameter 'rank'"):
        arrivals_spec(manifest, "s3://x/zoo", "s3://x/in/", "bad", params={"rank": 3})
    full = arrivals_spec(manifest, "s3://x/zoo", "s3://x/in/", "ok", method="tsv_m", mode="full")
    assert full.method == "tsv_m"


def test_accuracy_after_each_arrival_is_scored_on_the_tasks_seen(zoo, tmp_path, monkeypatch):
    from mergeflow.arrivals import accuracy_after_each_arrival
    from mergeflow.continual import Arrival
    from mergeflow.storage import file_sha256
    from zoo.zoo import arrivals_spec

    folder, manifest = zoo
    tasks = [t["name"] for t in manifest["tasks"]]
    spec = arrivals_spec(manifest, str(folder), str(folder / "checkpoints"), "curve",
                         method="average", device="cpu")  # fmt: skip
    base = Arrival(uri=str(folder / "base.safetensors"),
                   sha256=file_sha256(folder / "base.safetensors"))  # fmt: skip
    landed = []
    for task in tasks:
        path = folder / "checkpoints" / f"{task}.safetensors"
        landed.append(Arrival(uri=str(path), sha256=file_sha256(path), task=task))
    cache = str(tmp_path / "cache")
    rows = accuracy_after_each_arrival(spec, base, landed, cache)
    assert [(r["arrivals"], r["task"]) for r in rows] == [(2, tasks[1]), (3, tasks[2])]
    assert all(0 < r["mean_accuracy"] <= 1 and r["mean_normalized"] > 0 for r in rows)
    folds = count_folds(monkeypatch)
    assert accuracy_after_each_arrival(spec, base, landed, cache) == rows and folds == []


def test_mode_full_merges_everything_that_landed_again(
    prefect_harness, landing_zoo, tracking, tmp_path
):
    from flows.arrivals import merge_arrivals
    from zoo.zoo import arrivals_spec

    folder, manifest = landing_zoo
    landing = "s3://mf-arrivals/full/"
    spec = arrivals_spec(manifest, "s3://mf-arrivals/zoo", landing, "full", device="cpu",
                         mode="full", method="ties", params={"density": 0.5})  # fmt: skip
    tasks = [t["name"] for t in manifest["tasks"]]
    for task in tasks[:2]:
        land(folder, task, landing)
    result = merge_arrivals(spec, cache_dir=str(tmp_path / "cache"))
    # in landing order, names breaking a tie within S3's one-second times
    assert sorted(result["taken_in"]) == sorted(tasks[:2]) and result["version"] == "1"
    version = versions("full")[0]
    assert version.tags["method"] == "ties" and version.tags["mergeflow.arrivals.count"] == "2"
