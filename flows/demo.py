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
import logging
import os
import secrets
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "mergeflow-demo"
MODEL_NAME = "mergeflow-demo"


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
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # one bar per artifact MLflow copies (a few KiB each) is noise here
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )


# every method the field compares CART against, each searched over its scale on the
# validation splits like CART's grid; the table shows each family's best point
DEMO_FAMILIES = [
    {"method": "task_arithmetic", "search": {"scale": [0.1, 0.2, 0.3, 0.5]}},
    {"method": "ties", "search": {"scale": [0.5, 1.0, 1.5]}},
    {
        "method": "ties",
        "label": "ties centered",
        "params": {"center": "average"},
        "search": {"scale": [0.5, 1.0, 1.5]},
    },
    {"method": "dare", "search": {"scale": [0.1, 0.2, 0.3]}},
    {"method": "tsv_m", "search": {"scale": [0.5, 1.0, 1.5]}},
    {"method": "iso_c", "search": {"scale": [0.5, 1.0, 1.5]}},
    {"method": "iso_cts", "search": {"scale": [0.5, 1.0, 1.5]}},
    {"method": "consensus", "search": {"scale": [0.2, 0.3, 0.5]}},
    {"method": "pcb", "search": {"scale": [0.5, 1.0, 1.5]}},
    # the checkpoints in the zoo's task order, as if arriving one at a time
    {"method": "opcm", "search": {"alpha": [0.5, 0.7, 0.9]}},
]
# data-aware methods adapt on the validation images (never their labels); the adaptations
# keep each task's predictions diverse, without which they lose accuracy on this zoo (shown
# by the "entropy only" row)
ADAPTATION = {"steps": 100, "lr": 3e-3, "diversity": 1.0}
DEMO_BASELINES = [
    "zeroshot",
    "average",
    "finetuned",
    "tall_masks",
    {"method": "fisher", "params": {"samples": 64}},
    {"method": "regmean", "params": {"samples": 64}},
    {"method": "adamerging", "label": "adamerging", "params": ADAPTATION},
    {
        "method": "cart_adamerging",
        "label": "cart_adamerging",
        "params": {**ADAPTATION, "init": 1.5},
    },
    {
        "method": "cart_adamerging",
        "label": "cart_adamerging eata",
        "params": {**ADAPTATION, "init": 1.5, "select": "eata"},
    },
    {
        "method": "cart_adamerging",
        "label": "cart_adamerging entropy only",
        "params": {**ADAPTATION, "init": 1.5, "diversity": 0.0},
    },
    # Concrete subspace masks over task arithmetic and over layer-wise AdaMerging; the mask
    # logits take a larger step than the paper's 1e-3 (which needs its 2,000 steps to move)
    {
        "method": "concrete",
        "label": "concrete ta",
        "params": {"steps": 100, "lr": 2e-2, "diversity": 1.0},
    },
    {
        "method": "concrete",
        "label": "concrete adamerging",
        "params": {
            "over": "adamerging",
            "steps": 50,
            "lr": 2e-2,
            "adamerging_steps": 100,
            "adamerging_lr": 3e-3,
            "diversity": 1.0,
        },
    },
    # Twin-Merging: routed per image, over the paper's shared task arithmetic and over CART
    {"method": "twin_merging", "label": "twin_merging"},
    {
        "method": "twin_merging",
        "label": "twin_merging over cart",
        "params": {"shared": "cart", "shared_params": {"rank_ratio": 0.12, "scale": 2.0}},
    },
]


CONTINUAL_METHODS = ("opcm", "average", "task_arithmetic", "ties")


def continual_curve(manifest: dict, prefix: str, cache_dir: Path) -> list[dict]:
    """The zoo's checkpoints arriving one at a time, in the zoo's task order: each
    continual method's accuracy on the tasks seen so far after each arrival."""
    from mergeflow.arrivals import accuracy_after_each_arrival
    from mergeflow.continual import Arrival
    from mergeflow.run import RunInputs
    from zoo.zoo import arrivals_spec, zoo_spec

    digests = RunInputs.resolve(zoo_spec(manifest, prefix, MODEL_NAME), str(cache_dir)).digests
    base = Arrival(uri=f"{prefix}/base.safetensors", sha256=digests[f"{prefix}/base.safetensors"])
    landed = [
        Arrival(uri=uri, sha256=digests[uri], task=t["name"])
        for t in manifest["tasks"]
        for uri in [f"{prefix}/checkpoints/{t['name']}.safetensors"]
    ]
    rows = []
    for method in CONTINUAL_METHODS:
        spec = arrivals_spec(manifest, prefix, f"{prefix}/checkpoints/",
                             f"{MODEL_NAME}-{method}", method=method)  # fmt: skip
        step = time.perf_counter()
        rows += accuracy_after_each_arrival(spec, base, landed, str(cache_dir))
        seconds, final = time.perf_counter() - step, 100 * rows[-1]["mean_normalized"]
        print(f"continual: {method}, {len(landed)} arrivals folded, scored after each "
              f"({seconds:.0f} s; {final:.1f} normalized at the end)")  # fmt: skip
    return rows


def continual_table(rows: list[dict]) -> str:
    steps = sorted({r["arrivals"] for r in rows})
    tasks = {r["arrivals"]: r["task"] for r in rows}
    lines = [
        "continual merging, the zoo's checkpoints arriving in order: normalized accuracy (%) "
        "on the tasks seen so far",
        f"{'method':16s}" + "".join(f"{f'+{tasks[t]}':>10s}" for t in steps),
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        by_step = {r["arrivals"]: r for r in rows if r["method"] == method}
        cells = "".join(f"{100 * by_step[t]['mean_normalized']:10.1f}" for t in steps)
        lines.append(f"{method:16s}{cells}")
    return "\n".join(lines)


def _score_champion(spec, cache_dir: Path) -> dict:
    from mergeflow import pipeline
    from mergeflow.run import RunInputs, open_run

    run = open_run(RunInputs.resolve(spec, str(cache_dir)))
    uri = f"models:/{spec.registered_model}@champion"
    return pipeline.summary_of(run, pipeline.registered_model_scores(run, uri))


# (CART over two tasks is weight averaging: their centered task vectors cancel)
ALIGNMENT_METHODS = (("average", {}), ("task_arithmetic", {"scale": 0.3}))


def alignment_comparison(manifest: dict, prefix: str, cache_dir: Path, demo_dir: Path) -> dict:
    """The zoo's first two tasks, the second one's checkpoint permuted (a random
    function-preserving permutation: what fine-tuning from a permuted copy of the base gives,
    since training is permutation-equivariant), merged as they are, unaligned and after the
    spec's ``align`` step: each method's mean report accuracy over the two tasks."""
    from mergeflow.align import VitPermutation, permute, vit_layout
    from mergeflow.candidates import DataAware, FixedMethod
    from mergeflow.checkpoints import load_state_dict, save_state_dict
    from mergeflow.evaluation import REPORT
    from mergeflow.models import image_tower_heads
    from mergeflow.pipeline import align_checkpoints, score
    from mergeflow.run import RunInputs, open_run
    from mergeflow.spec import AlignSpec
    from mergeflow.storage import CheckpointCache
    from zoo.zoo import zoo_spec

    spec = zoo_spec(manifest, prefix, f"{MODEL_NAME}-align")
    first, second = spec.tasks[:2]
    permuted = demo_dir / "permuted" / f"{second.name}.safetensors"
    if not permuted.is_file():
        state = load_state_dict(second.checkpoint, CheckpointCache(str(cache_dir)))
        layout = vit_layout(state, image_tower_heads(spec.model))
        permuted.parent.mkdir(parents=True, exist_ok=True)
        save_state_dict(permute(state, VitPermutation.random(layout, 0), layout), str(permuted))
    pair = spec.model_copy(update={"tasks": (first, second)})
    moved = (first, second.model_copy(update={"checkpoint": str(permuted)}))
    unaligned = pair.model_copy(update={"tasks": moved, "base_check": "off"})
    inputs = {
        "same base": RunInputs.resolve(pair, str(cache_dir)),
        "permuted, unaligned": RunInputs.resolve(unaligned, str(cache_dir)),
        "permuted, aligned": align_checkpoints(
            RunInputs.resolve(unaligned.model_copy(update={"align": AlignSpec()}), str(cache_dir))
        ),
    }
    table = {}
    candidates = [FixedMethod(name=m, params=p, label=m) for m, p in ALIGNMENT_METHODS]
    # PLeaS: weight matching (the align step), then each layer refit by least squares
    candidates.append(DataAware(name="pleas", params={"samples": 16}, label="pleas"))
    for candidate in candidates:
        method = candidate.label
        for setting, run_inputs in inputs.items():
            accuracy = score(open_run(run_inputs), candidate, REPORT)
            table.setdefault(method, {})[setting] = sum(accuracy.values()) / len(accuracy)
    return {"tasks": (first.name, second.name), "table": table}


def alignment_table(comparison: dict) -> str:
    first, second = comparison["tasks"]
    settings = list(next(iter(comparison["table"].values())))
    lines = [
        f"weight matching: {second} fine-tuned from a permuted copy of the base (the same "
        f"function, other coordinates), merged with {first}: mean report accuracy (%)",
        f"{'method':16s}" + "".join(f"{s:>22s}" for s in settings),
    ]
    for method, row in comparison["table"].items():
        lines.append(f"{method:16s}" + "".join(f"{100 * row[s]:>22.1f}" for s in settings))
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
    from flows.console import quiet_console, quiet_servers, start_ephemeral_api

    quiet_servers()
    quiet_console()  # before anything logs: Prefect's console handler, thinned
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "creating tables"
    api_starting = start_ephemeral_api()  # comes up while the zoo is built or checked

    from zoo.zoo import build_zoo, upload_zoo, zoo_spec

    manifest = build_zoo(demo_dir / "zoo")
    if api_starting is not None:
        api_starting.join()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access line per S3 request
    server.start()
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        prefix = f"s3://{BUCKET}/zoo"
        count = upload_zoo(demo_dir / "zoo", prefix)
        print(f"s3: uploaded {count} zoo files to {prefix} (local S3 on 127.0.0.1:{port})")
        spec = zoo_spec(
            manifest,
            prefix,
            MODEL_NAME,
            families=DEMO_FAMILIES,
            baselines=DEMO_BASELINES,
            compression={"rank_ratio": 0.12, "register_model": True},
        )
        (demo_dir / "spec.yaml").write_text(spec.to_yaml())
        print(
            f"spec: {demo_dir / 'spec.yaml'}  ({len(spec.tasks)} tasks, "
            f"{len(spec.grid.points())} CART grid points, "
            f"{sum(len(f.points()) for f in spec.grid.families)} points of other methods)"
        )

        from flows.merge_pipeline import merge_pipeline

        result = merge_pipeline(spec, cache_dir=str(demo_dir / "cache"))
        champion = _score_champion(spec, demo_dir / "cache")
        curve = continual_curve(manifest, prefix, demo_dir / "cache")
        alignment = alignment_comparison(manifest, prefix, demo_dir / "cache", demo_dir)
    finally:
        server.stop()

    from mergeflow import report
    from mergeflow.registry import resolve_version

    registration = result["registration"]
    print()
    print(report.text(result))
    print(
        f"models:/{registration['name']}@champion is version "
        f"{resolve_version(registration['name'], 'champion')}"
    )
    print(
        f"models:/{registration['name']}@champion loaded back from the registry and scored "
        f"(what `mergeflow score-model` does): report mean accuracy "
        f"{100 * champion['mean_accuracy']:.1f}"
    )
    from mergeflow.charts import accuracy_after_arrivals

    print()
    print(continual_table(curve))
    print(f"chart: {accuracy_after_arrivals(curve, demo_dir / 'continual.png')}")
    print()
    print(alignment_table(alignment))
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
