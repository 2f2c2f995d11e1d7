"""Deployments against a real Prefect server: started here on 127.0.0.1 (its own SQLite
database), set up by infra/setup_prefect.py from prefect.yaml, served by a real process
worker; runs are triggered with parameters as the UI sends them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Prefect server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"Prefect server not healthy after {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on a free port of 127.0.0.1; yields (API URL, environment)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k.endswith("TIMEOUT")
    }
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }
    )
    log = home / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(url, server, log, 180)
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture
def worker(prefect_server, tmp_path, tracking, s3_endpoint):
    """A process worker on pool ``cpu`` with the environment a deployment's runs get."""
    _, server_env = prefect_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # AWS_* too
    env.update({k: v for k, v in server_env.items() if k.startswith("PREFECT_")})
    env.update(
        {
            "MERGEFLOW_HOME": str(ROOT),
            "MERGEFLOW_ARTIFACT_ROOT": os.environ["MERGEFLOW_ARTIFACT_ROOT"],
            "MERGEFLOW_CACHE_DIR": str(tmp_path / "worker-cache"),
            "MLFLOW_TRACKING_URI": tracking,
            "PYTHONPATH": str(ROOT),
        }
    )
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu", "--limit", "1"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    yield env, log
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def test_deployments_run_from_ui_parameters_and_on_schedule_from_a_variable(
    prefect_server, worker, zoo, bucket, tracking, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from mergeflow.zoo.zoo import upload_zoo, zoo_spec

    url, _ = prefect_server
    env, worker_log = worker
    folder, manifest = zoo
    prefix = f"s3://{bucket}/zoo"
    upload_zoo(folder, prefix)
    spec = zoo_spec(
        manifest,
        prefix,
        "deployed",
        rank_ratios=(0.1, 0.5),
        scales=(1.0,),
        baselines=["average", "finetuned"],
    )
    spec_file = tmp_path / "nightly.yaml"
    spec_file.write_text(spec.to_yaml())

    # pools, the gpu tag limit, the nightly spec variable and the deployments, as an
    # operator would set them up (make deploy)
    setup = subprocess.run(
        [
            sys.executable,
            "infra/setup_prefect.py",
            "--gpus",
            "2",
            "--nightly-spec",
            str(spec_file),
            "--deployment",
            "on-demand",
            "--deployment",
            "nightly",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-2000:]

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        assert client.read_work_pool("cpu").type == "process"
        assert client.read_work_pool("gpu").concurrency_limit == 2
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 2
        on_demand = client.read_deployment_by_name("merge-pipeline/on-demand")
        nightly = client.read_deployment_by_name("scheduled-merge-pipeline/nightly")
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
        # the UI's form: the spec as a typed object with its fields described
        schema = on_demand.parameter_openapi_schema
        assert schema["required"] == ["spec"]
        fields = schema["definitions"]["MergeSpec"]["properties"]
        assert fields["registered_model"]["description"]
        assert fields["device"]["default"] == "auto"
        assert "description" in schema["properties"]["cache_dir"]

        # a run with the spec as the UI sends it: plain JSON
        parameters = {"spec": json.loads(spec.model_dump_json())}
        run = run_deployment("merge-pipeline/on-demand", parameters=parameters, timeout=900)
        assert run.state.is_completed(), worker_log.read_text()[-4000:]

        # the scheduled deployment reads the spec from the variable when it starts; the
        # same spec on the same store: nothing recomputed, no second version
        scheduled = run_deployment("scheduled-merge-pipeline/nightly", timeout=900)
        assert scheduled.state.is_completed(), worker_log.read_text()[-4000:]

    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='deployed'")
    assert len(versions) == 1
    champion = client.get_model_version_by_alias("deployed", "champion")
    assert champion.tags["prefect.flow_run_id"] == str(run.id)
    assert champion.tags["prefect.deployment"] == "merge-pipeline/on-demand"
    assert champion.tags["mergeflow.spec_digest"] == spec.digest()
