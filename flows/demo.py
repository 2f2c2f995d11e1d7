"""`make demo`: the merge pipeline end to end on the offline zoo, with no servers to start.

1. builds the zoo once (data from installed packages, a tiny CLIP pretrained here, one
   fine-tuned checkpoint per task) under ``.demo/zoo``; later runs reuse it;
2. starts a local S3 server (moto, 127.0.0.1) and uploads the zoo to ``s3://mergeflow-demo``;
3. runs the ``merge-pipeline`` flow (Prefect's ephemeral API, MLflow on SQLite);
4. prints the per-task table, the chosen rank and scale, the champion, and how to open
   the MLflow and Prefect UIs on these stores.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "mergeflow-demo"
MODEL_NAME = "mergeflow-demo-cart"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configure(demo_dir: Path, port: int) -> None:
    # a throwaway key pair for the throwaway local S3 server; nothing real is involved
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": f"demo{secrets.token_hex(8)}",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_EC2_METADATA_DISABLED": "true",
            "MLFLOW_TRACKING_URI": f"sqlite:///{demo_dir / 'mlflow.db'}",
            "MERGEFLOW_ARTIFACT_ROOT": (demo_dir / "mlartifacts").as_uri(),
            "PREFECT_HOME": str(demo_dir / "prefect"),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "DO_NOT_TRACK": "1",
        }
    )


def _table(comparison: dict, tasks: list[str]) -> str:
    order = ["zeroshot", "average", "task_arithmetic", "cart", "finetuned"]
    names = [n for n in order if n in comparison] + [n for n in comparison if n not in order]
    width = max(9, *(len(t) for t in tasks))
    lines = [f"{'method':17s}" + "".join(f"{t[:width]:>{width + 1}s}" for t in tasks) + "     mean"]
    for name in names:
        acc = comparison[name]["accuracy"]
        cells = "".join(f"{100 * acc[t]:>{width + 1}.1f}" for t in tasks)
        lines.append(f"{name:17s}{cells}{100 * comparison[name]['mean_accuracy']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", type=Path, default=ROOT / ".demo", help="where the demo keeps state"
    )
    args = parser.parse_args(argv)
    demo_dir = args.dir.resolve()
    demo_dir.mkdir(parents=True, exist_ok=True)

    from moto.server import ThreadedMotoServer

    port = _free_port()
    _configure(demo_dir, port)
    started = time.perf_counter()

    from mergeflow.zoo.zoo import build_zoo, upload_zoo, zoo_spec

    manifest = build_zoo(demo_dir / "zoo")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        prefix = f"s3://{BUCKET}/zoo"
        count = upload_zoo(demo_dir / "zoo", prefix)
        print(f"s3: uploaded {count} zoo files to {prefix} (local S3 on 127.0.0.1:{port})")
        spec = zoo_spec(manifest, prefix, MODEL_NAME)
        (demo_dir / "spec.yaml").write_text(spec.to_yaml())
        print(
            f"spec: {demo_dir / 'spec.yaml'}  ({len(spec.tasks)} tasks, "
            f"{len(spec.grid.points())} grid points)"
        )

        from flows.merge_pipeline import merge_pipeline

        result = merge_pipeline(spec, str(demo_dir / "cache"))
    finally:
        server.stop()

    tasks = [t.name for t in spec.tasks]
    registration = result["registration"]
    print()
    print("Report-split accuracy (%) per task and method")
    print(_table(result["comparison"], tasks))
    print()
    best = result["best"]
    print(
        f"chosen: CART rank_ratio={best['rank_ratio']} scale={best['scale']} "
        "(best mean normalized accuracy on the validation splits)"
    )
    aliases = ", ".join(registration["aliases"])
    holder = (
        registration["version"]
        if "champion" in registration["aliases"]
        else registration["previous_champion"]
    )
    print(
        f"registered: models:/{registration['name']}/{registration['version']} ({aliases}); "
        f"models:/{registration['name']}@champion is version {holder}"
    )
    print(f"demo took {time.perf_counter() - started:.0f} s")
    print()
    print("Open the UIs on these stores:")
    print(
        f"  MLflow:  {sys.executable} -m mlflow ui --backend-store-uri "
        f"{os.environ['MLFLOW_TRACKING_URI']} --port 5000"
    )
    print(
        f"  Prefect: PREFECT_HOME={os.environ['PREFECT_HOME']} "
        f"{Path(sys.executable).parent / 'prefect'} server start"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
