"""Shared fixtures: tiny real open_clip image towers and a real S3 endpoint (moto's server)."""

from __future__ import annotations

import os
import re
import socket

import prefect  # noqa: F401  (see below)
import pytest
import torch

# Importing prefect sets up its logging, whose console handler keeps the sys.stderr of that
# moment. Imported here, at collection, that is pytest's session-long capture; imported
# first inside a test using capfd/capsys, it would be that test's capture, closed after it,
# and every later Prefect log line would fail to write (an order dependence).


@pytest.fixture(autouse=True, scope="session")
def _own_cache_dir(tmp_path_factory):
    """A session's own MERGEFLOW_CACHE_DIR (fetched checkpoints, remembered digests), so a
    test run never reads or fills the user's ~/.cache/mergeflow."""
    saved = os.environ.get("MERGEFLOW_CACHE_DIR")
    os.environ["MERGEFLOW_CACHE_DIR"] = str(tmp_path_factory.mktemp("mergeflow-cache"))
    yield
    if saved is None:
        os.environ.pop("MERGEFLOW_CACHE_DIR", None)
    else:
        os.environ["MERGEFLOW_CACHE_DIR"] = saved


def tiny_tower_state(seed: int = 0, width: int = 32, layers: int = 2) -> dict[str, torch.Tensor]:
    """The state dict of a real (tiny) open_clip VisionTransformer, with CLIP's ``visual.``
    prefix, so parameter names are exactly open_clip's."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    tower = VisionTransformer(
        image_size=16,
        patch_size=8,
        width=width,
        layers=layers,
        heads=2,
        mlp_ratio=2.0,
        output_dim=16,
    )
    return {f"visual.{k}": v.detach().clone() for k, v in tower.state_dict().items()}


def tiny_tower(state: dict[str, torch.Tensor]):
    """The open_clip VisionTransformer of :func:`tiny_tower_state` (width 32, 2 layers)
    holding ``state`` (names with or without ``visual.``)."""
    from open_clip.transformer import VisionTransformer

    tower = VisionTransformer(
        image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=16
    )
    tower.load_state_dict({k.removeprefix("visual."): v for k, v in state.items()})
    return tower


class TinyClip(torch.nn.Module):
    """What a data-aware method runs: an image tower and CLIP's logit scale."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))


def tiny_data_aware_inputs(num_tasks: int = 3, samples: int = 8, classes: int = 5):
    """``(base, finetuned, samples, inputs)``: a tiny tower, ``num_tasks`` fine-tuned-like
    copies, random images and heads per task, and the DataAwareInputs over them."""
    from mergeflow.data_aware import DataAwareInputs, TaskSamples

    base = tiny_tower_state(seed=5, width=32, layers=2)
    finetuned = finetune_like(base, num_tasks=num_tasks, seed=9, strength=0.2)
    gen = torch.Generator().manual_seed(4)
    task_samples = [
        TaskSamples(
            f"task{t}",
            torch.randn(samples, 3, 16, 16, generator=gen),
            torch.randn(classes, 16, generator=gen),
        )
        for t in range(num_tasks)
    ]
    inputs = DataAwareInputs(TinyClip(tiny_tower(base)), base, finetuned, task_samples)
    return base, finetuned, task_samples, inputs


def order_statistics_of(chunks, ranks) -> list[float]:
    """The values at ``ranks`` of the stream ``chunks``, by OrderStatistics' two passes."""
    from mergeflow.order_stats import OrderStatistics

    stats = OrderStatistics()
    for chunk in chunks:
        stats.observe(chunk)
    stats.next_pass(ranks)
    for chunk in chunks:
        stats.observe(chunk)
    return stats.values()


def finetune_like(base: dict[str, torch.Tensor], num_tasks: int, seed: int = 1, strength=0.05):
    """``num_tasks`` copies of ``base``, each moved by its own task vector: a low-rank part
    on matrices (as fine-tuning tends to give) plus small dense noise everywhere."""
    gen = torch.Generator().manual_seed(seed)
    models = []
    for _ in range(num_tasks):
        model = {}
        for key, value in base.items():
            delta = strength * 0.2 * torch.randn(value.shape, generator=gen)
            if value.ndim == 2:
                m, n = value.shape
                r = max(1, min(m, n) // 4)
                left = torch.randn(m, r, generator=gen)
                right = torch.randn(r, n, generator=gen)
                delta = delta + strength * (left @ right) / r
            model[key] = (value.float() + delta).to(value.dtype)
        models.append(model)
    return models


def fold_all(method, base, finetuned, folder, params=None):
    """The continual ``method``'s record after folding the state dicts ``finetuned`` in
    order over ``base``, each running vector in its own file under ``folder``; and the
    reader of the last one."""
    from mergeflow.checkpoints import SafetensorsReader, StateDictReader
    from mergeflow.continual import Arrival, fold_in, start_record

    record = start_record(method, params, Arrival(uri="base", sha256="0" * 64))
    base_reader, running = StateDictReader(base, "base"), None
    for t, state in enumerate(finetuned):
        arrival = Arrival(uri=f"task{t}", sha256=f"{t + 1:064x}", task=f"task{t}")
        out = str(folder / f"running-{t}.safetensors")
        record = fold_in(record, base_reader, StateDictReader(state, f"task{t}"), arrival, out,
                         running)  # fmt: skip
        running = SafetensorsReader(record.running)
    return record, running


def merged_by(record, base, running):
    """The merged model a continual record stands for, as a state dict."""
    from mergeflow.checkpoints import StateDictReader
    from mergeflow.continual import ContinualModel

    return dict(ContinualModel(record, StateDictReader(base, "base"), running).tensors())


def run_of(spec, cache_dir):
    """The :class:`~mergeflow.run.Run` of ``spec`` with its digests resolved through the
    cache at ``cache_dir`` (what the flow builds from its fetches)."""
    from mergeflow.run import RunInputs, open_run

    return open_run(RunInputs.resolve(spec, str(cache_dir)))


def planned(spec, label: str):
    """The candidate of ``spec``'s plan (grid, baselines, references) labelled ``label``."""
    from mergeflow.plan import make_plan

    plan = make_plan(spec)
    every = [c for _, c in plan.grid] + list(plan.baselines) + list(plan.references)
    return next(c for c in every if c.label == label)


def candidate(method: str, label: str | None = None, **params):
    """The candidate for a method with ``params``, as a spec's baseline would give it (CART
    merged over the checkpoints, not rebuilt from a grid's factors)."""
    from mergeflow.plan import candidate_of
    from mergeflow.spec import MethodSpec

    return candidate_of(MethodSpec(method=method, params=params, label=label), 0.0)[0]


@pytest.fixture(scope="session")
def tower():
    return tiny_tower_state(seed=0)


@pytest.fixture(scope="session")
def family(tower):
    """A base tower and four fine-tuned copies."""
    return tower, finetune_like(tower, num_tasks=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 with fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_endpoint, request):
    """A fresh bucket per test."""
    import boto3

    name = "mf-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prefect_harness():
    """A real temporary Prefect API (SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


ZOO_TASKS = ("shapes", "letters", "digits")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """A reduced offline zoo (3 tasks, short training), built once per session."""
    from zoo.zoo import ZooConfig, build_zoo

    folder = tmp_path_factory.mktemp("zoo")
    config = ZooConfig(
        tasks=ZOO_TASKS,
        pretrain_steps=40,
        finetune_steps=25,
        max_per_task=360,
        test_size=60,
        validation_size=40,
        workers=2,
    )
    manifest = build_zoo(folder, config, say=lambda line: None)
    return folder, manifest


@pytest.fixture(scope="session")
def demo_zoo():
    """The demo's own zoo (``ZooConfig`` defaults: 8 tasks) in the folder ``make demo`` uses:
    reused when it was built there with the same settings, else built there once (about
    12 minutes on 2 cores; ``make demo`` then reuses it)."""
    from pathlib import Path

    from zoo.zoo import build_zoo

    folder = Path(__file__).resolve().parent.parent / ".demo" / "zoo"
    return folder, build_zoo(folder, say=lambda line: None)


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """MLflow on a fresh SQLite store (with its model registry) for one test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MERGEFLOW_ARTIFACT_ROOT", (tmp_path / "artifacts").as_uri())
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
