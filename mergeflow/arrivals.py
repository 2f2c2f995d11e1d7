"""Checkpoints that keep arriving: what has landed under a prefix, and folding it in.

An :class:`ArrivalsSpec` names a prefix where fine-tuned checkpoints land, each named after
its task (``PREFIX/mnist.safetensors``, ``PREFIX/mnist/`` for a model folder or a PEFT
adapter), the tasks' datasets, and how to merge: ``mode: continual`` folds each new
checkpoint into a running state with a continual method (:mod:`mergeflow.continual`: one
fold per arrival, three models' worth of reads, nothing re-merged), ``mode: full`` merges
everything that has landed with any registered method.

Every state is kept by content in the result store: the state after arrivals d_1 … d_t is
``continual/K_t`` (its record, JSON) and ``continual/K_t.safetensors`` (its running
vector), K_t a digest of the method, its parameters, the base and d_1 … d_t in order. So a
run that dies in a fold resumes at that fold, a re-run finds every fold done, and which
checkpoints are folded in is read from the stream's head record (``arrivals/HEAD``) by
content digest, not by name: a re-uploaded identical file is not folded twice.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mergeflow.checkpoints import SafetensorsReader, open_checkpoint
from mergeflow.continual import Arrival, FoldRecord, fold_in, get_continual, start_record
from mergeflow.errors import CheckpointError, ParameterError
from mergeflow.results import ResultStore
from mergeflow.run import content_key
from mergeflow.spec import MergeSpec, TaskSpec, _first_error, _Frozen, read_spec_data
from mergeflow.storage import CheckpointCache, default_cache_dir, filesystem, is_remote

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
STATES, HEADS = "continual", "arrivals"


class ArrivingTask(TaskSpec):
    """A task whose checkpoint is whatever lands under the prefix by its name."""

    checkpoint: str | None = Field(
        None, description="not given: found under the prefix as NAME.safetensors or NAME/"
    )


class ArrivalsSpec(_Frozen):
    """A stream of fine-tuned checkpoints landing under ``prefix``, merged as they come."""

    prefix: str = Field(description="where fine-tuned checkpoints land, e.g. s3://zoo/finetuned/")
    model: str = Field(description="the CLIP architecture (as in a merge spec)")
    base: str = Field(description="URI of the pre-trained checkpoint every task started from")
    tasks: tuple[ArrivingTask, ...] = Field(
        min_length=1, description="every task that may arrive, with its dataset"
    )
    mode: Literal["continual", "full"] = Field(
        "continual",
        description="fold each new checkpoint into a running state (continual) or merge "
        "everything that has landed again (full)",
    )
    method: str = Field(
        "opcm",
        description="continual: opcm, average, task_arithmetic or ties; full: any method",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    registered_model: str = Field(description="MLflow registered-model name")
    device: str = Field("auto", description="auto (CUDA when present), cpu or cuda")
    batch_size: int = Field(256, gt=0, description="evaluation batch size")
    allowed_roots: tuple[str, ...] = Field((), description="as in a merge spec")

    @model_validator(mode="after")
    def check_method(self) -> ArrivalsSpec:
        _settings(self)
        return self

    @classmethod
    def parse(cls, data: dict, source: str = "arrivals spec") -> ArrivalsSpec:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ParameterError(f"{source}: {' '.join(_first_error(exc).splitlines())}") from None
        except ParameterError as exc:
            raise ParameterError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, uri: str) -> ArrivalsSpec:
        """The spec in the YAML file at ``uri`` (a local path or any fsspec URI)."""
        return cls.parse(read_spec_data(uri), uri)

    def task(self, name: str) -> ArrivingTask | None:
        return next((t for t in self.tasks if t.name == name), None)

    def merge_spec(self, landed: list[Arrival]) -> MergeSpec:
        """The merge spec of the tasks that have landed (two or more), in arrival order."""
        tasks = []
        for arrival in landed:
            task = self.task(arrival.task).model_dump(exclude={"checkpoint"})
            tasks.append({**task, "checkpoint": arrival.uri})
        data = {
            "model": self.model,
            "base": self.base,
            "tasks": tasks,
            "baselines": ["finetuned"],
            "registered_model": self.registered_model,
            "device": self.device,
            "batch_size": self.batch_size,
            "allowed_roots": self.allowed_roots,
        }
        return MergeSpec.parse(data, "arrivals spec")


class Landed(_Frozen):
    """A checkpoint found under the prefix: its URI, its task, when it landed (seconds)."""

    uri: str
    task: str
    landed_at: float


def _landed_at(info: dict) -> float:
    for key in ("LastModified", "mtime", "created"):
        value = info.get(key)
        if value is not None:
            return value.timestamp() if hasattr(value, "timestamp") else float(value)
    return 0.0


def find_landed(spec: ArrivalsSpec) -> tuple[list[Landed], list[str]]:
    """What has landed under the prefix, in order of landing (then name), and the entries
    that name no task of the spec (left alone). A folder lands when its newest file does."""
    fs, root = filesystem(spec.prefix)
    root = root.rstrip("/")
    try:
        fs.invalidate_cache(root)
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return [], []
    except Exception as exc:  # botocore's errors are not OSErrors
        raise CheckpointError(
            f"{spec.prefix}: cannot list the prefix: {type(exc).__name__}: {exc}",
            transient=not isinstance(exc, PermissionError),
        ) from None
    landed, strangers = [], []
    protocol = spec.prefix.split("://")[0] + "://" if is_remote(spec.prefix) else ""
    for entry in entries:
        name = posixpath.basename(entry["name"].rstrip("/"))
        if name.startswith("."):
            continue  # partial uploads and editors' files
        folder = entry.get("type") == "directory"
        stem = (
            name
            if folder
            else next((name[: -len(s)] for s in CHECKPOINT_SUFFIXES if name.endswith(s)), None)
        )
        uri = f"{protocol}{entry['name'].rstrip('/')}" + ("/" if folder else "")
        if stem is None or spec.task(stem) is None:
            strangers.append(uri)
            continue
        when = _landed_at(entry)
        if folder:
            inner = fs.ls(entry["name"], detail=True)
            when = max((_landed_at(i) for i in inner), default=when)
        landed.append(Landed(uri=uri, task=stem, landed_at=when))
    tasks = [item.task for item in landed]
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:
        raise ParameterError(
            f"{spec.prefix}: more than one checkpoint for task {twice[0]!r}: keep one"
        )
    return sorted(landed, key=lambda item: (item.landed_at, item.uri)), strangers


def _settings(spec: ArrivalsSpec) -> dict:
    """The method's parameters with its defaults filled in: what keys name, so that
    ``{}`` and the defaults spelled out are one state."""
    from mergeflow.methods import get_method

    method = get_continual(spec.method) if spec.mode == "continual" else get_method(spec.method)
    return method.parse_params(spec.params).model_dump(mode="json")


def state_key(spec: ArrivalsSpec, base_digest: str, arrivals: list[Arrival]) -> str:
    """K_t: names the continual state after ``arrivals`` (their digests, in order)."""
    return content_key(
        "continual/1", spec.method, _settings(spec), base_digest, [a.sha256 for a in arrivals]
    )


def stream_key(spec: ArrivalsSpec, base_digest: str) -> str:
    """Names a stream's head: one per registered model, mode, method and base."""
    return content_key("arrivals/1", spec.registered_model, spec.mode, spec.method,
                       _settings(spec), base_digest)  # fmt: skip


def read_state(store: ResultStore, key: str) -> FoldRecord | None:
    found = store.read_json(STATES, key)
    return None if found is None else FoldRecord.model_validate(found)


def fold_arrivals(
    spec: ArrivalsSpec,
    base: Arrival,
    arrivals: list[Arrival],
    store: ResultStore,
    progress: bool = False,
) -> FoldRecord:
    """The continual state after ``arrivals``, in order: each fold found in the store by
    its content key, or made from the one before it and stored (vector, then record)."""
    if spec.mode != "continual":
        raise ParameterError("fold_arrivals is for mode: continual")
    record = start_record(spec.method, spec.params, base)
    cache = store.cache
    for t in range(len(arrivals)):
        key = state_key(spec, base.sha256, arrivals[: t + 1])
        found = read_state(store, key)
        if found is not None:
            record = found
            continue
        record = _fold_one(record, arrivals[t], key, store, cache, spec.device, progress)
    return record


def _fold_one(record, arrival, key, store, cache: CheckpointCache, device, progress):
    from mergeflow.svd import resolve_device

    scratch = default_cache_dir() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch, prefix="fold-") as folder:
        local = os.path.join(folder, "running.safetensors")
        running = None
        if record.running is not None:
            running = open_state(record, cache)
        try:
            with (
                open_checkpoint(record.base.uri, cache) as base_reader,
                open_checkpoint(arrival.uri, cache, base=base_reader) as new_reader,
            ):
                after = fold_in(record, base_reader, new_reader, arrival, local, running,
                                resolve_device(device), progress)  # fmt: skip
        finally:
            if running is not None:
                running.close()
        name = f"{key}.safetensors"
        store.file(STATES, name, lambda uri: _copy_to(local, uri))
    after = after.model_copy(update={"running": store.uri(STATES, name)})
    store.write_json(STATES, key, after.model_dump(mode="json"))
    return after


def _copy_to(local: str, uri: str) -> None:
    from mergeflow.storage import staged_output

    with staged_output(uri) as target:
        shutil.copyfile(local, target)


def open_state(record: FoldRecord, cache: CheckpointCache) -> SafetensorsReader:
    """The reader of a state's running vector (fetched through ``cache``)."""
    return SafetensorsReader(cache.fetch(record.running).path, record.running)


class StreamHead(_Frozen):
    """What a stream has taken in (``arrivals/HEAD``): the checkpoints, in the order they
    were merged, the state they made (continual) and the version registered from them."""

    arrivals: tuple[Arrival, ...] = ()
    state_key: str | None = None
    version: str | None = None

    def folded(self, sha256: str) -> bool:
        return any(a.sha256 == sha256 for a in self.arrivals)


def read_head(store: ResultStore, spec: ArrivalsSpec, base_digest: str) -> StreamHead:
    found = store.read_json(HEADS, stream_key(spec, base_digest))
    return StreamHead() if found is None else StreamHead.model_validate(found)


def write_head(store: ResultStore, spec: ArrivalsSpec, base_digest: str, head: StreamHead):
    store.write_json(HEADS, stream_key(spec, base_digest), head.model_dump(mode="json"))


def next_arrivals(head: StreamHead, landed: list[Arrival]) -> list[Arrival]:
    """The landed checkpoints the stream has not taken in, in landing order. A task that
    was taken in already cannot come again with other weights: a continual merge cannot
    take a model back out."""
    new = [a for a in landed if not head.folded(a.sha256)]
    seen = {a.task: a for a in head.arrivals}
    for arrival in new:
        if arrival.task in seen:
            before = seen[arrival.task]
            raise ParameterError(
                f"{arrival.uri}: task {arrival.task!r} was merged in already from "
                f"{before.uri} (sha256 {before.sha256[:12]}), and this one holds other "
                "weights: a merge cannot take a model back out. Use a new registered_model "
                "(or mode: full) to start again"
            )
    return new


def history_tags(history: list[Arrival]) -> dict[str, str]:
    """A registered version's arrival history, as MLflow tags (each value ≤ 5,000
    characters: the tasks in order, and each task's digest under its own tag)."""
    tags = {
        "mergeflow.arrivals.count": str(len(history)),
        "mergeflow.arrivals.order": ",".join(a.task or "?" for a in history)[:5000],
    }
    for i, a in enumerate(history):
        tags[f"mergeflow.arrival.{i + 1:03d}"] = f"{a.task} {a.sha256} {a.uri}"[:5000]
    return tags


def accuracy_after_each_arrival(
    spec: ArrivalsSpec, base: Arrival, arrivals: list[Arrival], cache_dir: str | None = None
) -> list[dict]:
    """The continual merge after each arrival from the second on, scored on the tasks seen
    so far (report split): ``{method, arrivals, task, mean_accuracy, mean_normalized}``
    per step (``task``: the one that arrived). Folds and scores are kept by content, so a
    second call recomputes nothing."""
    from mergeflow import pipeline
    from mergeflow.candidates import Continual
    from mergeflow.evaluation import REPORT
    from mergeflow.run import RunInputs, open_run

    store = ResultStore(CheckpointCache(cache_dir))
    rows = []
    for t in range(2, len(arrivals) + 1):
        history = arrivals[:t]
        fold_arrivals(spec, base, history, store)
        run = open_run(RunInputs.resolve(spec.merge_spec(history), cache_dir))
        key = state_key(spec, base.sha256, history)
        candidate = Continual(label=f"{spec.method} after {t}", name=spec.method,
                              params=spec.params, state_key=key)  # fmt: skip
        summary = pipeline.summary_of(run, pipeline.score(run, candidate, REPORT))
        rows.append(
            {
                "method": spec.method,
                "arrivals": t,
                "task": history[-1].task,
                "mean_accuracy": summary["mean_accuracy"],
                "mean_normalized": summary["mean_normalized"],
            }
        )
    return rows
