"""Load: several pipeline runs at once against one Prefect server and one MLflow server.

Starts, on 127.0.0.1, a Prefect server (SQLite), an MLflow tracking server (SQLite, with its
model registry), and a local S3 server holding a reduced zoo; then launches ``--runs``
``mergeflow run`` processes at the same moment. Runs come in pairs on one spec and one
result store (so two runs race for the same scores and the same registration), pairs
differ in their registered model. Prints each run's exit status and wall time, the total
wall time, and the versions each model ended with; exits 1 if any run failed or any model
got more than one version.

Usage: ``python bench/load.py [--runs 4] [--workdir DIR]`` (the zoo is built once under
``WORKDIR/zoo``, about 1½ minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from grid import machine_line

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, what: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{what} did not answer at {url} within {seconds} s")


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="pipeline runs at once (default 4)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mergeflow-load-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(machine_line())

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request

    from zoo.zoo import ZooConfig, build_zoo, upload_zoo, zoo_spec

    config = ZooConfig(
        tasks=("shapes", "letters", "digits"),
        pretrain_steps=40,
        finetune_steps=25,
        max_per_task=360,
        test_size=60,
        validation_size=40,
    )
    manifest = build_zoo(workdir / "zoo", config, say=lambda line: None)

    s3_port, prefect_port, mlflow_port = _free_port(), _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        {
            "AWS_ACCESS_KEY_ID": "load-test",
            "AWS_SECRET_ACCESS_KEY": "load-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
            "AWS_EC2_METADATA_DISABLED": "true",
            "PREFECT_HOME": str(workdir / "prefect"),
            "PREFECT_API_DATABASE_CONNECTION_URL": (
                f"sqlite+aiosqlite:///{workdir / 'prefect.db'}"
            ),
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    servers = []
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="mergeflow-load")
        upload_zoo(workdir / "zoo", "s3://mergeflow-load/zoo")
        servers.append(
            _start(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(prefect_port),
                ],
                env,
                workdir / "prefect-server.log",
            )
        )
        servers.append(
            _start(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--backend-store-uri",
                    f"sqlite:///{workdir / 'mlflow.db'}",
                    "--default-artifact-root",
                    (workdir / "mlartifacts").as_uri(),
                    "--workers",
                    "1",
                ],
                env,
                workdir / "mlflow-server.log",
            )
        )
        prefect_api = f"http://127.0.0.1:{prefect_port}/api"
        tracking = f"http://127.0.0.1:{mlflow_port}"
        _wait(f"{prefect_api}/health", servers[0], "the Prefect server")
        _wait(f"{tracking}/health", servers[1], "the MLflow server")
        env.update({"PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": tracking})

        runs = []
        for i in range(args.runs):
            pair = i // 2
            spec = zoo_spec(
                manifest,
                "s3://mergeflow-load/zoo",
                f"load-{pair}",
                rank_ratios=(0.1, 0.3, 0.5),
                scales=(1.0, 2.0),
                families=[{"method": "ties", "search": {"scale": [0.5, 1.0]}}],
                baselines=["average", "finetuned"],
            )
            spec_file = workdir / f"spec-{i}.yaml"
            spec_file.write_text(spec.to_yaml())
            run_env = {
                **env,
                "MERGEFLOW_CACHE_DIR": str(workdir / f"cache-{i}"),
                # the two runs of a pair share one result store on S3
                "MERGEFLOW_RESULT_STORE": f"s3://mergeflow-load/store-{pair}",
            }
            runs.append((i, spec.registered_model, run_env, spec_file))
        print(f"{args.runs} runs at once: Prefect {prefect_api}, MLflow {tracking}")
        started = time.perf_counter()
        processes = [
            (
                i,
                name,
                time.perf_counter(),
                _start(
                    [sys.executable, "-m", "mergeflow", "run", str(spec_file)],
                    run_env,
                    workdir / f"run-{i}.log",
                ),
            )
            for i, name, run_env, spec_file in runs
        ]
        failures = 0
        for i, name, begun, process in processes:
            process.wait()
            seconds = time.perf_counter() - begun
            state = "ok" if process.returncode == 0 else f"FAILED (status {process.returncode})"
            failures += process.returncode != 0
            print(f"  run {i} ({name}): {state}, {seconds:.1f} s; log {workdir / f'run-{i}.log'}")
        total = time.perf_counter() - started

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=tracking)
        duplicated = 0
        for name in sorted({name for _, name, _, _ in runs}):
            versions = client.search_model_versions(f"name='{name}'")
            aliases = client.get_registered_model(name).aliases
            duplicated += len(versions) > 1
            print(f"  {name}: {len(versions)} version(s), aliases {aliases}")
        print(
            f"wall time {total:.1f} s for {args.runs} runs; failures: {failures}; "
            f"models with more than one version: {duplicated}"
        )
        return 1 if failures or duplicated else 0
    finally:
        for server in servers:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        s3.stop()


if __name__ == "__main__":
    sys.exit(main())
