"""The fault catalogue: every fault docs/faults.md lists, one test each, by stage.

Each test asserts what the user is told (the file, key, field or URI at fault) and that
nothing earlier is lost or changed: no partial output, earlier outputs and cache entries
intact, the registry's champion where it was. Real parts: moto's S3 server, MLflow on
SQLite, Prefect's test API, the zoo.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import finetune_like, run_of, tiny_tower_state

from mergeflow import pipeline
from mergeflow.checkpoints import save_state_dict
from mergeflow.cli import main
from mergeflow.errors import CheckpointError, ParameterError
from mergeflow.evaluation import evaluation_context
from mergeflow.spec import MergeSpec
from mergeflow.storage import CheckpointCache, file_sha256

ROOT = Path(__file__).resolve().parent.parent
EARLIER = b"an earlier result that a failed merge must not touch"


# --- checkpoints ----------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    """A base, two fine-tuned checkpoints, and an output path holding an earlier result."""
    base = tiny_tower_state()
    tuned = finetune_like(base, 2)
    paths = {"base": tmp_path / "base.safetensors"}
    save_state_dict(base, paths["base"])
    for i, state in enumerate(tuned):
        paths[f"task{i}"] = tmp_path / f"task{i}.safetensors"
        save_state_dict(state, paths[f"task{i}"])
    out = tmp_path / "merged.safetensors"
    out.write_bytes(EARLIER)
    return base, tuned, paths, out


def _merge(paths, out, capsys, method="cart"):
    code = main(
        [
            "merge",
            "--method",
            method,
            "--base",
            str(paths["base"]),
            "--finetuned",
            str(paths["task0"]),
            str(paths["task1"]),
            "--out",
            str(out),
            "-q",
        ]
    )
    err = capsys.readouterr().err.strip()
    return code, err


def _replace_task1(paths, state):
    save_state_dict(state, paths["task1"])


class TestCheckpointFaults:
    def _refused(self, files, capsys, state=None, raw: bytes | None = None, method="cart"):
        _, _, paths, out = files
        if raw is not None:
            paths["task1"].write_bytes(raw)
        else:
            _replace_task1(paths, state)
        code, err = _merge(paths, out, capsys, method)
        assert code == 2
        assert len(err.splitlines()) == 1, err
        assert out.read_bytes() == EARLIER  # the earlier output is untouched
        assert not list(out.parent.glob(".partial-*"))
        return err

    def test_missing_key(self, files, capsys):
        state = dict(files[1][1])
        del state["visual.proj"]
        err = self._refused(files, capsys, state)
        assert "'visual.proj'" in err and "task1.safetensors" in err and "missing" in err

    def test_extra_key(self, files, capsys):
        state = {**files[1][1], "visual.adapter.weight": torch.ones(4, 4)}
        err = self._refused(files, capsys, state)
        assert "'visual.adapter.weight'" in err and "task1.safetensors" in err

    def test_shape_mismatch(self, files, capsys):
        state = {**files[1][1], "visual.proj": torch.zeros(16, 32)}
        err = self._refused(files, capsys, state)
        assert "'visual.proj'" in err and "(32, 16)" in err and "(16, 32)" in err

    def test_dtype_mismatch(self, files, capsys):
        state = {**files[1][1], "visual.proj": files[1][1]["visual.proj"].half()}
        err = self._refused(files, capsys, state)
        assert "'visual.proj'" in err and "float16" in err and "task1.safetensors" in err

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
    def test_non_finite_weight(self, files, capsys, bad):
        weight = files[1][1]["visual.transformer.resblocks.0.mlp.c_fc.weight"].clone()
        weight[3, 5] = bad
        state = {**files[1][1], "visual.transformer.resblocks.0.mlp.c_fc.weight": weight}
        err = self._refused(files, capsys, state)
        assert "task1.safetensors" in err and "c_fc.weight" in err and "NaN or Inf" in err

    def test_truncated_safetensors(self, files, capsys):
        whole = files[2]["task1"].read_bytes()
        err = self._refused(files, capsys, raw=whole[: len(whole) // 2])
        assert "task1.safetensors" in err and "truncated" in err
        assert re.search(r"tensor '[^']+' ends at byte \d+ of a \d+-byte file", err), err

    def test_corrupt_safetensors_header(self, files, capsys):
        whole = bytearray(files[2]["task1"].read_bytes())
        whole[9:40] = b"\xff" * 31  # after its opening brace, the JSON header is no longer JSON
        err = self._refused(files, capsys, raw=bytes(whole))
        assert "task1.safetensors: unreadable safetensors header" in err

    def test_header_without_its_opening_brace_is_neither_format(self, files, capsys):
        whole = bytearray(files[2]["task1"].read_bytes())
        whole[8:9] = b"x"  # byte 8 opens a safetensors JSON header; no zip or pickle starts so
        err = self._refused(files, capsys, raw=bytes(whole))
        assert "task1.safetensors: neither a safetensors nor a torch checkpoint" in err

    def test_empty_file(self, files, capsys):
        err = self._refused(files, capsys, raw=b"")
        assert "task1.safetensors" in err and "empty" in err

    def test_pickle_payload_is_refused_and_never_runs(self, files, capsys, tmp_path):
        marker = tmp_path / "the-payload-ran"

        class Payload:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        _, _, paths, out = files
        evil = tmp_path / "task1.pt"
        torch.save({"visual.proj": Payload()}, evil)
        paths["task1"] = evil
        code, err = _merge(paths, out, capsys)
        assert code == 2 and "task1.pt" in err and "refused" in err
        assert "system" in err  # names what the pickle would have imported
        assert not marker.exists()
        assert out.read_bytes() == EARLIER

    def test_checkpoint_from_another_base_is_refused_by_distance(self, files, tmp_path, caplog):
        _, _, paths, _ = files
        stranger = finetune_like(tiny_tower_state(seed=7), 1)[0]  # another init
        save_state_dict(stranger, paths["task1"])
        spec = _checkpoint_spec(paths)
        with pytest.raises(ParameterError) as refused:
            pipeline.check_bases(run_of(spec, tmp_path / "cache"))
        message = str(refused.value)
        assert "task 'task1'" in message and "task1.safetensors" in message
        assert "max_base_distance 0.5" in message
        # warn instead: the distances come back, the far one is logged
        warned = spec.model_copy(update={"base_check": "warn"})
        distances = pipeline.check_bases(run_of(warned, tmp_path / "cache"))
        assert distances["task0"] < 0.5 < distances["task1"]
        assert "task 'task1'" in caplog.text

    def test_integer_buffers_are_copied_from_the_base_never_averaged(self, files, capsys):
        base, tuned, paths, out = files
        index = torch.arange(5, dtype=torch.int64)
        save_state_dict({**base, "visual.position_ids": index}, paths["base"])
        save_state_dict({**tuned[0], "visual.position_ids": index}, paths["task0"])
        save_state_dict({**tuned[1], "visual.position_ids": index * 3}, paths["task1"])
        code, err = _merge(paths, out, capsys, method="average")
        assert code == 0, err
        from safetensors.torch import load_file

        merged = load_file(str(out))["visual.position_ids"]
        assert merged.dtype == torch.int64 and torch.equal(merged, index)


def _checkpoint_spec(paths) -> MergeSpec:
    return MergeSpec.parse(
        {
            "model": "mergeflow-tiny-vit",
            "base": str(paths["base"]),
            "tasks": [
                {
                    "name": name,
                    "checkpoint": str(paths[name]),
                    "dataset": {"uri": "unused"},
                    "classes": ["a", "b"],
                }
                for name in ("task0", "task1")
            ],
            "registered_model": "checks",
        }
    )


# --- specs ----------------------------------------------------------------------------------


def _valid_spec() -> dict:
    task = {
        "checkpoint": "s3://zoo/{}.safetensors",
        "dataset": {"uri": "s3://zoo/data/{}"},
        "classes": ["a", "b"],
    }
    return {
        "model": "mergeflow-tiny-vit",
        "base": "s3://zoo/base.safetensors",
        "tasks": [
            {**json.loads(json.dumps(task).replace("{}", name)), "name": name}
            for name in ("mnist", "svhn")
        ],
        "registered_model": "zoo",
    }


def _with(change):
    data = _valid_spec()
    change(data)
    return data


SPEC_FAULTS = {
    "unknown top-level field": (lambda d: d.update(colour="red"), r"^colour: "),
    "duplicate tasks": (
        lambda d: d["tasks"].append(copy.deepcopy(d["tasks"][0])),
        r"^tasks: .*'mnist'.*(twice|more than once|duplicate)",
    ),
    "one task": (lambda d: d["tasks"].pop(), r"^tasks: .*at least 2"),
    "empty grid": (lambda d: d.update(grid={"rank_ratios": []}), r"^grid\.rank_ratios: "),
    "rank_ratio 0": (lambda d: d.update(grid={"rank_ratios": [0.0]}), r"^grid\.rank_ratios: "),
    "rank_ratio above 1": (
        lambda d: d.update(grid={"rank_ratios": [1.5]}),
        r"^grid\.rank_ratios: .*1\.5",
    ),
    "unknown method": (lambda d: d.update(baselines=["slerp"]), r"^baselines: .*'slerp'"),
    "unknown model config": (lambda d: d.update(model="ViT-Z-99"), r"^model: .*'ViT-Z-99'"),
    "bad task name": (lambda d: d["tasks"][1].update(name="a b"), r"^tasks\.1\.name: "),
    "template without {c}": (
        lambda d: d["tasks"][0].update(templates=["a photo"]),
        r"^tasks\.0\.templates: .*\{c\}",
    ),
    "bad device": (lambda d: d.update(device="tpu"), r"^device: .*'tpu'"),
    "non-positive batch size": (lambda d: d.update(batch_size=0), r"^batch_size: "),
    "unknown base_check": (lambda d: d.update(base_check="maybe"), r"^base_check: "),
}


class TestSpecFaults:
    @pytest.mark.parametrize("fault", list(SPEC_FAULTS))
    def test_invalid_spec_names_the_field(self, fault):
        change, reason = SPEC_FAULTS[fault]
        with pytest.raises(ParameterError) as refused:
            MergeSpec.parse(_with(change), source="spec.yaml")
        message = str(refused.value)
        assert len(message.splitlines()) == 1, message
        assert re.search(reason, message.removeprefix("spec.yaml: ")), message

    @pytest.fixture
    def zoo_spec_data(self, zoo):
        from zoo.zoo import zoo_spec

        folder, manifest = zoo
        spec = zoo_spec(manifest, str(folder), "faults", rank_ratios=(0.1,), scales=(1.0,))
        return spec.model_dump(mode="json")

    def _prepare(self, data, tmp_path):
        spec = MergeSpec.parse(data)
        with pytest.raises(ParameterError) as refused:
            evaluation_context(spec, CheckpointCache(tmp_path / "cache"))
        return str(refused.value)

    def test_unreadable_dataset(self, zoo_spec_data, tmp_path):
        garbage = tmp_path / "garbage.parquet"
        garbage.write_bytes(b"not a parquet file")
        zoo_spec_data["tasks"][0]["dataset"] = {"uri": str(garbage), "format": "parquet"}
        message = self._prepare(zoo_spec_data, tmp_path)
        assert f"dataset {garbage}" in message and "cannot read split 'validation'" in message

    def test_class_names_do_not_match_the_labels(self, zoo_spec_data, tmp_path):
        zoo_spec_data["tasks"][2]["classes"] = ["zero", "one"]
        message = self._prepare(zoo_spec_data, tmp_path)
        name = zoo_spec_data["tasks"][2]["name"]
        assert re.search(rf"task '{name}': 2 class names but the \w+ split has label \d+", message)

    def test_missing_split(self, zoo_spec_data, tmp_path):
        zoo_spec_data["tasks"][1]["dataset"]["report_split"] = "holdout"
        message = self._prepare(zoo_spec_data, tmp_path)
        assert "cannot read split 'holdout'" in message and "holdout.parquet" in message


# --- S3 -------------------------------------------------------------------------------------


@pytest.fixture
def fresh_s3_clients():
    """s3fs keeps one client per settings; tests that change credentials need new ones."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def object_uri(bucket, tower):
    uri = f"s3://{bucket}/base.safetensors"
    save_state_dict(tower, uri)
    return uri


class TestS3Faults:
    def test_missing_bucket(self, s3_endpoint, tmp_path):
        with pytest.raises(CheckpointError, match=r"s3://mf-no-such-bucket/x.safetensors: no such"):
            CheckpointCache(tmp_path).fetch("s3://mf-no-such-bucket/x.safetensors")

    def test_missing_key(self, bucket, tmp_path):
        uri = f"s3://{bucket}/absent.safetensors"
        with pytest.raises(CheckpointError, match=re.escape(uri) + ": no such") as refused:
            CheckpointCache(tmp_path).fetch(uri)
        assert not refused.value.transient  # a missing object is not retried

    def test_no_credentials(self, object_uri, tmp_path, monkeypatch, fresh_s3_clients):
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        with pytest.raises(CheckpointError) as refused:
            CheckpointCache(tmp_path / "cache").fetch(object_uri)
        assert object_uri in str(refused.value) and "NoCredentialsError" in str(refused.value)
        assert not refused.value.transient

    def test_access_denied(self, object_uri, s3_endpoint, tmp_path, monkeypatch, fresh_s3_clients):
        import boto3
        import moto.settings

        iam = boto3.client("iam", endpoint_url=s3_endpoint)
        iam.create_user(UserName="no-s3")
        key = iam.create_access_key(UserName="no-s3")["AccessKey"]
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # enforce IAM
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(CheckpointError, match=re.escape(object_uri) + ": access denied"):
            CheckpointCache(tmp_path / "cache").fetch(object_uri)
        assert not list((tmp_path / "cache").rglob("*.safetensors"))

    @pytest.mark.full
    def test_server_going_away_mid_download(
        self, prefect_harness, bucket, tmp_path, monkeypatch, fresh_s3_clients
    ):
        """The fetch task runs against a dedicated S3 server that is stopped after the
        first chunk: the attempt fails as transient, leaving no partial file and no cache
        entry; the task's retry (after the server is back) gets the whole, verified
        object."""
        import hashlib

        import boto3
        from conftest import _free_port
        from moto.server import ThreadedMotoServer

        import mergeflow.storage as storage
        from tasks.checkpoints import fetch_checkpoint, retry_on_transient_io

        port = _free_port()
        servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
        servers[0].start()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        uri = f"s3://{bucket}/large.safetensors"
        save_state_dict({"w": torch.randn(1024, 1024)}, uri)  # 4 MiB, shared moto backend
        stored = boto3.client("s3").get_object(Bucket=bucket, Key="large.safetensors")
        expected = hashlib.sha256(stored["Body"].read()).hexdigest()
        monkeypatch.setattr(storage, "CHUNK_BYTES", 256 * 1024)
        real_md5 = storage.hashlib.md5
        downloads = []

        class StopsTheServerOnce:
            def __init__(self):
                self.digest, self.first = real_md5(), not downloads
                downloads.append(self)

            def update(self, chunk):
                if self.first:
                    self.first = False
                    servers[-1].stop()
                self.digest.update(chunk)

            def hexdigest(self):
                return self.digest.hexdigest()

        monkeypatch.setattr(storage.hashlib, "md5", StopsTheServerOnce)
        cache_dir = tmp_path / "cache"
        failures, leftovers = [], []

        def restart_then_decide(task, task_run, state):
            failures.append(state.data)
            leftovers.extend(p for p in cache_dir.rglob("*") if p.is_file())
            servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
            servers[-1].start()
            return retry_on_transient_io(task, task_run, state)

        fetch = fetch_checkpoint.with_options(
            retries=2, retry_delay_seconds=0, retry_condition_fn=restart_then_decide
        )
        try:
            fetched = fetch(uri, str(cache_dir))
        finally:
            servers[-1].stop()
        assert len(failures) == 1 and len(downloads) == 2  # one failed attempt, one retry
        assert isinstance(failures[0], CheckpointError) and failures[0].transient
        cause = type(failures[0].__cause__).__name__  # what the client raised, named
        assert f"{uri}: download failed: {cause}: " in str(failures[0])
        assert leftovers == []  # the failed attempt left no partial file and no entry
        assert fetched["sha256"] == expected == file_sha256(fetched["path"])

    def test_cache_entry_whose_digest_no_longer_matches_is_fetched_again(
        self, object_uri, tmp_path
    ):
        cache = CheckpointCache(tmp_path)
        first = cache.fetch(object_uri)
        data = bytearray(first.path.read_bytes())
        data[-1] ^= 0xFF  # same size, other bytes: a silently corrupted cache file
        first.path.write_bytes(bytes(data))
        again = cache.fetch(object_uri)
        assert not again.from_cache
        assert file_sha256(again.path) == first.sha256

    def test_a_local_digest_is_remembered_across_runs_until_the_file_changes(
        self, tmp_path, monkeypatch
    ):
        import hashlib

        from mergeflow import storage

        monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(tmp_path / "cache"))
        hashed = []
        real_hash = storage._hash_file
        monkeypatch.setattr(storage, "_hash_file", lambda p: hashed.append(p) or real_hash(p))
        files = [tmp_path / f"w{i}.bin" for i in range(3)]
        for i, f in enumerate(files):
            f.write_bytes(os.urandom(1000 + i))
        truth = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
        assert storage.file_sha256s(files) == truth and len(hashed) == 3
        storage._LOCAL_DIGESTS.clear()  # as a new process would start
        assert storage.file_sha256s(files) == truth and len(hashed) == 3  # read back, not hashed
        before = files[0].stat()
        data = bytearray(files[0].read_bytes())
        data[0] ^= 0xFF  # same size, and the mtime put back: only ctime tells
        files[0].write_bytes(bytes(data))
        os.utime(files[0], ns=(before.st_atime_ns, before.st_mtime_ns))
        storage._LOCAL_DIGESTS.clear()
        changed = hashlib.sha256(bytes(data)).hexdigest()
        assert storage.file_sha256(files[0]) == changed != truth[0] and len(hashed) == 4
        for memo in (tmp_path / "cache" / "digests").rglob("*"):
            if memo.is_file():
                memo.write_text("{not json")  # a damaged memo is not trusted: hashed again
        storage._LOCAL_DIGESTS.clear()
        assert storage.file_sha256(files[1]) == truth[1] and len(hashed) == 5
        monkeypatch.setenv("MERGEFLOW_CACHE_DIR", str(files[2]))  # a file: nothing writable
        storage._LOCAL_DIGESTS.clear()
        assert storage.file_sha256(files[2]) == truth[2] and len(hashed) == 6

    def test_two_runs_sharing_one_cache_at_once(self, bucket, tmp_path):
        uri = f"s3://{bucket}/shared.safetensors"
        save_state_dict({"w": torch.randn(2048, 1024)}, uri)  # 8 MiB
        code = (
            "import sys; from mergeflow.storage import CheckpointCache; "
            "print(CheckpointCache(sys.argv[1]).fetch(sys.argv[2]).sha256)"
        )
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(tmp_path / "cache"), uri],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            for _ in range(2)
        ]
        digests = [run.communicate(timeout=120)[0].strip() for run in runs]
        assert [run.returncode for run in runs] == [0, 0]
        assert digests[0] == digests[1] and len(digests[0]) == 64
        entry = CheckpointCache(tmp_path / "cache").fetch(uri)
        assert entry.from_cache and file_sha256(entry.path) == digests[0]
        assert not list((tmp_path / "cache").rglob(".partial-*"))


# --- the registry and whole runs ------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo_on_s3(zoo, s3_endpoint):
    import boto3

    from zoo.zoo import upload_zoo

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="mf-faults")
    folder, manifest = zoo
    upload_zoo(folder, "s3://mf-faults/zoo")
    return "s3://mf-faults/zoo", manifest


def _spec(zoo_on_s3, name, **overrides):
    from zoo.zoo import zoo_spec

    prefix, manifest = zoo_on_s3
    settings = {"rank_ratios": (0.1, 0.5), "scales": (1.0,), "baselines": ["average", "finetuned"]}
    return zoo_spec(manifest, prefix, name, **{**settings, **overrides})


class TestRegistryFaults:
    def test_mlflow_unreachable_at_registration(
        self, prefect_harness, zoo_on_s3, tmp_path, monkeypatch
    ):
        from conftest import _free_port

        import flows.merge_pipeline as flow_module
        import mergeflow.registry as registry
        from tasks.pipeline import register_winner

        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        attempts = []
        real = registry.registered

        def counted(*args, **kwargs):
            attempts.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(registry, "registered", counted)
        monkeypatch.setattr(
            flow_module, "register_winner", register_winner.with_options(retry_delay_seconds=0)
        )
        spec = _spec(zoo_on_s3, "unreachable")
        with pytest.raises(Exception, match="registering unreachable failed") as failed:
            flow_module.merge_pipeline(spec, cache_dir=str(tmp_path / "cache"))
        assert len(attempts) == 3  # tried, then retried twice: it is a connection failure
        kept = re.search(r"are kept at (\S+\.safetensors)", str(failed.value)).group(1)
        from safetensors.torch import load_file

        weights = load_file(str(Path(kept)))
        assert "visual.proj" in weights

    @pytest.mark.full
    def test_a_failed_run_leaves_the_champion_and_earlier_results(
        self, prefect_harness, zoo_on_s3, tracking, tmp_path
    ):
        import mlflow

        from flows.merge_pipeline import merge_pipeline
        from mergeflow.results import ResultStore

        cache_dir = tmp_path / "cache"
        spec = _spec(zoo_on_s3, "kept")
        merge_pipeline(spec, cache_dir=str(cache_dir))
        client = mlflow.MlflowClient()
        champion = client.get_model_version_by_alias("kept", "champion")
        store = ResultStore(CheckpointCache(cache_dir))
        records = {key: store.read_json("scores", key) for key in store.records("scores")}

        # one task's checkpoint is replaced by a truncated upload; a wider grid asks for
        # new work, and the run fails at the fetch, naming the object
        prefix, _ = zoo_on_s3
        broken = f"{prefix}/checkpoints/{spec.tasks[1].name}.safetensors"
        whole = CheckpointCache(cache_dir).fetch(broken).path.read_bytes()
        from mergeflow.storage import filesystem

        fs, path = filesystem(broken)
        try:
            with fs.open(path, "wb") as f:
                f.write(whole[: len(whole) // 3])
            wider = _spec(zoo_on_s3, "kept", rank_ratios=(0.1, 0.3, 0.5))
            with pytest.raises(Exception, match=re.escape(broken)):
                merge_pipeline(wider, cache_dir=str(cache_dir))
        finally:
            with fs.open(path, "wb") as f:
                f.write(whole)
        after = client.get_model_version_by_alias("kept", "champion")
        assert (after.version, after.tags) == (champion.version, champion.tags)
        assert len(client.search_model_versions("name='kept'")) == 1
        for key, record in records.items():
            assert store.read_json("scores", key) == record


@pytest.mark.full
class TestRunFaults:
    def test_a_run_killed_mid_grid_resumes_and_ends_like_a_clean_run(
        self, prefect_harness, zoo_on_s3, tracking, tmp_path
    ):
        """``mergeflow run`` in a process SIGKILLed once a few grid points are scored; the
        re-run scores only what the first had not and ends with a clean run's tables."""
        import mlflow
        from prefect.settings import PREFECT_API_URL
        from test_production import _Counter, _scores_of

        from flows.merge_pipeline import merge_pipeline
        from mergeflow.results import ResultStore

        spec = _spec(
            zoo_on_s3, "killed", rank_ratios=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0), scales=(1.0, 2.0)
        )
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(spec.to_yaml())
        cache_dir = tmp_path / "cache"
        store = ResultStore(CheckpointCache(cache_dir))
        env = {
            **os.environ,
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "MLFLOW_TRACKING_URI": tracking,
            "PYTHONPATH": str(ROOT),
        }
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mergeflow",
                "run",
                str(spec_file),
                "--cache-dir",
                str(cache_dir),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # killed once a few grid points are scored: 3 records are the fine-tuned references
        deadline = time.monotonic() + 300
        while len(store.records("scores")) < 6 and run.poll() is None:
            assert time.monotonic() < deadline, "the run scored nothing in 5 minutes"
            time.sleep(0.02)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert run.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        kept = len(store.records("scores"))
        assert kept >= 6
        assert not mlflow.MlflowClient().search_registered_models()

        with pytest.MonkeyPatch.context() as patch:
            counter = _Counter(patch)
            resumed = merge_pipeline(spec, cache_dir=str(cache_dir))
        with pytest.MonkeyPatch.context() as patch:
            clean_counter = _Counter(patch)
            clean = merge_pipeline(spec, cache_dir=str(tmp_path / "clean-cache"))
        assert _scores_of(resumed) == _scores_of(clean)
        # each stored record is one forward pass the clean run made and the resumed one
        # did not
        assert counter.calls == clean_counter.calls - kept
