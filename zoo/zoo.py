"""Build the offline benchmark zoo once: data, a pretrained tiny CLIP, one checkpoint per task.

Layout of a built zoo folder (and of its copy on S3)::

    zoo.json                      what was built, with which settings
    base.safetensors              the pretrained tiny open_clip model (image + text towers)
    checkpoints/TASK.safetensors  the base with its image tower fine-tuned on TASK
    data/TASK/SPLIT.parquet       train / validation / test, PNG images + ClassLabel labels
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mergeflow.checkpoints import load_state_dict, save_state_dict
from mergeflow.models import create_model, tokenizer_for, zero_shot_head
from zoo import sources
from zoo.build import split_indices, write_split
from zoo.train import accuracy, as_model_input, finetune_image_tower, pretrain

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("mnist", "digits", "animals", "letters", "fonts", "textures", "textiles", "shapes")


class ZooConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: tuple[str, ...] = Field(DEFAULT_TASKS, min_length=2)
    model: str = "mergeflow-tiny-vit"
    test_size: int = 400
    validation_size: int = 200
    pretrain_steps: int = 300
    pretrain_fraction: float = Field(0.5, description="share of each train split captioned")
    finetune_steps: int = 300
    finetune_lr: float = 1e-3
    finetune_weight_decay: float = 0.1
    max_per_task: int | None = Field(None, description="cap on images per task (tests)")
    workers: int = 2
    seed: int = 0

    def digest(self) -> str:
        """Of these settings and of the model's architecture: a zoo built for an older
        config of the same model name is rebuilt, not reused."""
        import open_clip

        from mergeflow.models import known_model_configs

        if self.model not in known_model_configs():
            raise ValueError(f"zoo model {self.model!r}: no open_clip config of that name")
        architecture = json.dumps(open_clip.get_model_config(self.model), sort_keys=True)
        text = self.model_dump_json() + architecture
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_tasks(config: ZooConfig, say: Callable[[str], None]) -> list[sources.TaskData]:
    loaded = []
    for name in config.tasks:
        try:
            task = sources.SOURCES[name]()
        except sources.SourceUnavailable as exc:
            say(f"  skipping task {name}: {exc}")
            continue
        if config.max_per_task and len(task.labels) > config.max_per_task:
            keep = np.random.default_rng(config.seed).permutation(len(task.labels))
            keep = np.sort(keep[: config.max_per_task])
            task = sources.TaskData(
                task.name,
                task.images[keep],
                task.labels[keep],
                task.classes,
                task.templates,
                task.pretrain_caption,
            )
        loaded.append(task)
    if len(loaded) < 2:
        raise RuntimeError("fewer than two zoo tasks have their data installed")
    return loaded


def _finetune_worker(args: tuple) -> tuple[str, float, float]:
    torch.set_num_threads(1)  # one thread per worker process: two sometimes stall here
    (
        zoo_dir,
        model_name,
        task_name,
        head,
        images,
        labels,
        test_images,
        test_labels,
        steps,
        lr,
        weight_decay,
        seed,
    ) = args
    model = create_model(model_name, load_state_dict(Path(zoo_dir) / "base.safetensors"))
    started = time.perf_counter()
    x = as_model_input(images, model)
    finetune_image_tower(
        model,
        head,
        x,
        torch.from_numpy(labels),
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
    )
    test_x = as_model_input(test_images, model)
    acc = accuracy(model, head, test_x, torch.from_numpy(test_labels))
    save_state_dict(
        {k: v.detach() for k, v in model.state_dict().items()},
        Path(zoo_dir) / "checkpoints" / f"{task_name}.safetensors",
        {"zoo.task": task_name},
    )
    return task_name, acc, time.perf_counter() - started


MIN_TRAIN_IMAGES = 50  # per task, after the test and validation splits are taken


def data_digest(tasks: list[sources.TaskData]) -> str:
    """Of the tasks' images, labels, class names and templates: a zoo built from other data
    (a source package upgraded, a task's data changed) is rebuilt, not reused."""
    digest = hashlib.sha256()
    for task in tasks:
        digest.update(json.dumps([task.name, task.classes, task.templates]).encode())
        digest.update(np.ascontiguousarray(task.images).tobytes())
        digest.update(np.ascontiguousarray(task.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def check_split_sizes(config: ZooConfig, tasks: list[sources.TaskData]) -> None:
    """Refuse split sizes that leave a task fewer than MIN_TRAIN_IMAGES to train on."""
    for task in tasks:
        total = len(task.labels)
        train = total - config.test_size - config.validation_size
        if train < MIN_TRAIN_IMAGES:
            raise ValueError(
                f"zoo task {task.name!r}: {total} images leave {max(train, 0)} for training "
                f"after test_size {config.test_size} + validation_size "
                f"{config.validation_size}; at least {MIN_TRAIN_IMAGES} are needed: lower "
                "test_size or validation_size"
            )


def build_zoo(
    zoo_dir: str | Path, config: ZooConfig | None = None, say: Callable[[str], None] = print
) -> dict:
    """Build the zoo into ``zoo_dir`` unless a build of the same settings and data is there.

    The build is written into a sibling folder and moved into place when whole, so a build
    that fails (or is killed) never leaves a folder that a later call could take for a zoo.
    """
    config = config or ZooConfig()
    zoo_dir = Path(zoo_dir)
    manifest_path = zoo_dir / "zoo.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    same_config = manifest is not None and manifest.get("config_digest") == config.digest()
    made_from = sources.provenance()
    if same_config and manifest.get("sources") == made_from:
        # the same code and packages make the same data: no need to make it to compare
        say(f"zoo: reusing {zoo_dir} (built {manifest['built_at']})")
        return manifest
    tasks = _load_tasks(config, say)
    check_split_sizes(config, tasks)
    data = data_digest(tasks)
    why = "runs once; later runs reuse it"
    if manifest is not None:
        if same_config and manifest.get("data_digest") == data:
            manifest["sources"] = made_from  # the next check needs no data
            _write_manifest(manifest_path, manifest)
            say(f"zoo: reusing {zoo_dir} (built {manifest['built_at']}; its data is the same)")
            return manifest
        why = (
            "the zoo there was built from other settings"
            if not same_config
            else ("the zoo there was built from other data")
        )
    say(f"zoo: building into {zoo_dir} ({why})")
    building = zoo_dir.with_name(f"{zoo_dir.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        manifest = _build(building, config, tasks, say)
        manifest["data_digest"] = data
        manifest["sources"] = made_from
        _write_manifest(building / "zoo.json", manifest)
        if zoo_dir.exists():
            old = zoo_dir.with_name(f"{zoo_dir.name}.old-{os.getpid()}")
            zoo_dir.rename(old)
            building.rename(zoo_dir)
            shutil.rmtree(old)
        else:
            building.rename(zoo_dir)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    say(f"zoo: built in {manifest['build_seconds']:.0f} s")
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    """Written beside, then moved over: a reader never sees half a manifest."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(path)


def _build(
    zoo_dir: Path, config: ZooConfig, tasks: list[sources.TaskData], say: Callable[[str], None]
) -> dict:
    """Data, pretraining and fine-tuning into ``zoo_dir``; the manifest (not written)."""
    started = time.perf_counter()
    splits = {}
    for task in tasks:
        idx = split_indices(len(task.labels), config.test_size, config.validation_size, config.seed)
        splits[task.name] = idx
        for split, rows in idx.items():
            write_split(task, rows, zoo_dir / "data" / task.name / f"{split}.parquet")
    say(f"  data: {len(tasks)} tasks written as parquet")

    torch.manual_seed(config.seed)
    model = create_model(config.model)
    tokenizer = tokenizer_for(config.model)
    images, captions = [], []
    for task in tasks:
        train = splits[task.name]["train"]
        chosen = train[: max(1, int(len(train) * config.pretrain_fraction))]
        images.append(task.images[chosen])
        captions += [task.pretrain_caption.format(c=task.classes[i]) for i in task.labels[chosen]]
    pairs = as_model_input(np.concatenate(images), model)
    say(
        f"  pretraining {config.model} on {len(captions)} image-caption pairs "
        f"for {config.pretrain_steps} steps"
    )
    t0 = time.perf_counter()

    def report(step, total, loss):
        if (step + 1) % max(1, total // 5) == 0:
            say(f"    step {step + 1}/{total}  loss {loss:.3f}  ({time.perf_counter() - t0:.0f} s)")

    pretrain(
        model,
        tokenizer,
        pairs,
        captions,
        steps=config.pretrain_steps,
        seed=config.seed,
        progress=report,
    )
    save_state_dict(model.state_dict(), zoo_dir / "base.safetensors", {"zoo": "base"})

    heads, zero_shot = {}, {}
    for task in tasks:
        heads[task.name] = zero_shot_head(model, tokenizer, task.classes, task.templates)
        test = splits[task.name]["test"]
        zero_shot[task.name] = accuracy(
            model,
            heads[task.name],
            as_model_input(task.images[test], model),
            torch.from_numpy(task.labels[test]),
        )
    say("  zero-shot test accuracy: " + ", ".join(f"{n} {a:.2f}" for n, a in zero_shot.items()))

    jobs = []
    for i, task in enumerate(tasks):
        idx = splits[task.name]
        jobs.append(
            (
                str(zoo_dir),
                config.model,
                task.name,
                heads[task.name],
                task.images[idx["train"]],
                task.labels[idx["train"]],
                task.images[idx["test"]],
                task.labels[idx["test"]],
                config.finetune_steps,
                config.finetune_lr,
                config.finetune_weight_decay,
                config.seed + i,
            )
        )
    say(
        f"  fine-tuning {len(jobs)} image towers, {config.finetune_steps} steps each, "
        f"{config.workers} worker processes"
    )
    finetuned = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
        for name, acc, seconds in pool.map(_finetune_worker, jobs):
            finetuned[name] = acc
            say(
                f"    {name}: test accuracy {acc:.2f} (zero-shot {zero_shot[name]:.2f}), "
                f"{seconds:.0f} s"
            )

    manifest = {
        "config": config.model_dump(mode="json"),
        "config_digest": config.digest(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.perf_counter() - started, 1),
        "tasks": [
            {
                "name": t.name,
                "classes": list(t.classes),
                "templates": list(t.templates),
                "zero_shot_test_accuracy": zero_shot[t.name],
                "finetuned_test_accuracy": finetuned[t.name],
                "sizes": {s: len(rows) for s, rows in splits[t.name].items()},
            }
            for t in tasks
        ],
    }
    return manifest


def upload_zoo(zoo_dir: str | Path, prefix: str) -> int:
    """Copy a built zoo folder to ``prefix`` (e.g. ``s3://bucket/zoo``); objects already
    there with the same size are left alone. Returns the number of files uploaded."""
    from mergeflow.storage import filesystem

    zoo_dir = Path(zoo_dir)
    fs, root = filesystem(prefix)
    uploaded = 0
    for path in sorted(p for p in zoo_dir.rglob("*") if p.is_file()):
        target = f"{root.rstrip('/')}/{path.relative_to(zoo_dir).as_posix()}"
        if fs.exists(target) and fs.size(target) == path.stat().st_size:
            continue
        fs.put_file(str(path), target)
        uploaded += 1
    fs.invalidate_cache()
    return uploaded


def zoo_spec(
    manifest: dict,
    prefix: str,
    registered_model: str,
    rank_ratios=(0.04, 0.08, 0.12, 0.16, 0.25),
    scales=(1.0, 1.5, 2.0),
    families=(),
    **overrides,
):
    """The merge spec of a zoo stored under ``prefix``; ``families``: other methods' grids."""
    from mergeflow.spec import MergeSpec

    prefix = prefix.rstrip("/")
    data = {
        "model": manifest["config"]["model"],
        "base": f"{prefix}/base.safetensors",
        "tasks": [
            {
                "name": t["name"],
                "checkpoint": f"{prefix}/checkpoints/{t['name']}.safetensors",
                "dataset": {"uri": f"{prefix}/data/{t['name']}", "format": "parquet"},
                "classes": t["classes"],
                "templates": t["templates"],
            }
            for t in manifest["tasks"]
        ],
        "grid": {
            "rank_ratios": list(rank_ratios),
            "scales": list(scales),
            "families": list(families),
        },
        "registered_model": registered_model,
        **overrides,
    }
    return MergeSpec.parse(data, "zoo spec")


def arrivals_spec(manifest: dict, prefix: str, landing: str, registered_model: str, **overrides):
    """The arrivals spec of a zoo stored under ``prefix`` whose checkpoints land, one at
    a time, under ``landing`` (as ``NAME.safetensors``)."""
    from mergeflow.arrivals import ArrivalsSpec

    prefix = prefix.rstrip("/")
    data = {
        "prefix": landing,
        "model": manifest["config"]["model"],
        "base": f"{prefix}/base.safetensors",
        "tasks": [
            {
                "name": t["name"],
                "dataset": {"uri": f"{prefix}/data/{t['name']}", "format": "parquet"},
                "classes": t["classes"],
                "templates": t["templates"],
            }
            for t in manifest["tasks"]
        ],
        "registered_model": registered_model,
        **overrides,
    }
    return ArrivalsSpec.parse(data, "zoo arrivals spec")
