"""Score merged candidates on every task: zero-shot heads and prepared images, built once.

Everything that does not depend on the candidate (each task's head from the base model's
text tower, the decoded and preprocessed images of each split) is computed once in
:func:`prepare_tasks`; scoring a candidate is then one image-tower forward per batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from mergeflow.data import PreparedSplit, prepare_split
from mergeflow.errors import ParameterError
from mergeflow.models import (
    classify,
    create_model,
    image_transform,
    resolve_model,
    tokenizer_for,
    zero_shot_head,
)
from mergeflow.spec import MergeSpec, TaskSpec
from mergeflow.statedict import StateDict
from mergeflow.storage import CheckpointCache
from mergeflow.svd import resolve_device

log = logging.getLogger(__name__)

SELECTION, REPORT, ADAPTATION = "selection", "report", "adaptation"


@dataclass(frozen=True)
class PreparedTask:
    """A task ready to score: its frozen head (C, D) and its prepared splits."""

    name: str
    classes: tuple[str, ...]
    head: torch.Tensor
    splits: Mapping[str, PreparedSplit]


def transform_key(model) -> str:
    cfg = dict(model.visual.preprocess_cfg)
    return json.dumps({"size": model.visual.image_size, **cfg}, sort_keys=True, default=str)


def prepare_task(
    task: TaskSpec, base_model, tokenizer, cache: CheckpointCache | None = None
) -> PreparedTask:
    """Head and prepared selection/report splits for one task; errors name the task."""
    transform, key = image_transform(base_model), transform_key(base_model)
    dataset = task.dataset
    splits = {
        SELECTION: prepare_split(dataset, dataset.selection_split, transform, key, cache),
        REPORT: prepare_split(dataset, dataset.report_split, transform, key, cache),
    }
    # images data-aware methods adapt on (their labels are never used)
    by_name = {dataset.selection_split: splits[SELECTION], dataset.report_split: splits[REPORT]}
    adaptation = dataset.adaptation_split or dataset.selection_split
    splits[ADAPTATION] = by_name.get(adaptation) or prepare_split(
        dataset, adaptation, transform, key, cache
    )
    classes = task.classes or splits[SELECTION].label_names
    if not classes:
        raise ParameterError(
            f"task {task.name!r}: no class names given and the dataset's labels have none"
        )
    for role, split in splits.items():
        if len(split.labels) == 0:
            raise ParameterError(f"task {task.name!r}: the {role} split is empty")
        top = int(split.labels.max())
        if top >= len(classes) or int(split.labels.min()) < 0:
            raise ParameterError(
                f"task {task.name!r}: {len(classes)} class names but the {role} split has "
                f"label {top}"
            )
    head = zero_shot_head(base_model, tokenizer, classes, task.templates)
    return PreparedTask(task.name, tuple(classes), head, splits)


def prepare_tasks(
    tasks: Sequence[TaskSpec], config: str, base_state, cache: CheckpointCache | None = None
) -> list[PreparedTask]:
    from mergeflow.models import create_model

    base_model = create_model(config, base_state)
    tokenizer = tokenizer_for(config)
    return [prepare_task(t, base_model, tokenizer, cache) for t in tasks]


@torch.no_grad()
def correctness(
    model, task: PreparedTask, split: str = SELECTION, batch_size: int = 256, device="auto"
) -> np.ndarray:
    """Whether ``model``'s top-1 prediction is right, per image of one prepared split
    (bool, (N,), in the split's order)."""
    device = resolve_device(device)
    model = model.to(device).eval()
    data = task.splits[split]
    head = task.head.to(device)
    right = []
    for start in range(0, len(data.labels), batch_size):
        images = data.images[start : start + batch_size].to(device)
        predicted = classify(model, head, images).argmax(1).cpu()
        right.append(predicted == data.labels[start : start + batch_size])
    return torch.cat(right).numpy()


def accuracy(
    model, task: PreparedTask, split: str = SELECTION, batch_size: int = 256, device="auto"
) -> float:
    """Top-1 accuracy of ``model`` on one prepared split."""
    return float(correctness(model, task, split, batch_size, device).mean())


def judge_all(
    model, tasks: Sequence[PreparedTask], split: str = SELECTION, batch_size=256, device="auto"
) -> dict[str, np.ndarray]:
    """:func:`correctness` on each task."""
    return {t.name: correctness(model, t, split, batch_size, device) for t in tasks}


def summarize(accuracies: Mapping[str, float], finetuned: Mapping[str, float]) -> dict:
    """Per-task accuracy and normalized accuracy (merged / that task's fine-tuned model),
    and their means."""
    normalized = {
        name: (acc / finetuned[name] if finetuned.get(name) else float("nan"))
        for name, acc in accuracies.items()
    }
    n = len(accuracies)
    return {
        "accuracy": dict(accuracies),
        "normalized": normalized,
        "mean_accuracy": sum(accuracies.values()) / n,
        "mean_normalized": sum(normalized.values()) / n,
    }


@dataclass
class EvaluationContext:
    """What scoring needs that no candidate changes: one model, heads, prepared splits, and
    the base's weights (in its own names), which complete a candidate that lacks some."""

    spec: MergeSpec
    model: torch.nn.Module
    tasks: list[PreparedTask]
    base: StateDict = field(default_factory=dict, repr=False)
    # one model object serves every candidate: threads of one process take turns with it
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def complete(self, state: StateDict) -> StateDict:
        """``state`` plus every base tensor it lacks (a vision-only fine-tune's text tower)."""
        missing = [k for k in self.base if k not in state]
        return {**state, **{k: self.base[k] for k in missing}} if missing else state

    def judge(
        self, state: StateDict, split: str = SELECTION, only: str | None = None
    ) -> dict[str, np.ndarray]:
        """Per-task, per-image correctness of ``state`` (open_clip or transformers CLIP
        names; missing tensors taken from the base) on ``split`` (of task ``only``, if
        given)."""
        from mergeflow.hf_clip import to_open_clip

        tasks = [t for t in self.tasks if only in (None, t.name)]
        weights = to_open_clip(self.complete(state))
        with self.lock:
            self.model.load_state_dict(weights)
            return judge_all(self.model, tasks, split, self.spec.batch_size, self.spec.device)

    def score(
        self, state: StateDict, split: str = SELECTION, only: str | None = None
    ) -> dict[str, float]:
        """Per-task accuracy of ``state`` on ``split``: :meth:`judge`, averaged."""
        return {t: float(c.mean()) for t, c in self.judge(state, split, only).items()}

    def data_digest(self, split: str, only: str | None = None) -> str:
        """Digest of what scores on ``split`` depend on besides the weights: each task's
        prepared images and labels and its zero-shot head."""
        from mergeflow.run import content_key

        parts = [
            (
                t.name,
                t.splits[split].digest,
                hashlib.sha256(t.head.float().contiguous().numpy().tobytes()).hexdigest(),
            )
            for t in self.tasks
            if only in (None, t.name)
        ]
        return content_key("evaluation/1", parts)

    @property
    def heads(self) -> dict[str, torch.Tensor]:
        return {t.name: t.head for t in self.tasks}

    @property
    def classes(self) -> dict[str, tuple[str, ...]]:
        return {t.name: t.classes for t in self.tasks}


def check_text_tower(base: StateDict, uri: str) -> None:
    """The zero-shot heads come from the base's text tower: a base without one (the
    task-vectors papers' ``zeroshot.pt`` deletes it) is refused, saying what to give."""
    from mergeflow.hf_clip import to_open_clip

    names = to_open_clip(base)
    needed = (
        "token_embedding.weight",
        "transformer.resblocks.0.attn.in_proj_weight",
        "text_projection",
    )
    missing = [k for k in needed if k not in names]
    if missing:
        raise ParameterError(
            f"base {uri}: has no text tower (no {missing[0]!r}); the zero-shot heads are "
            "computed from it: give as base the whole pre-trained CLIP (e.g. open_clip's "
            "checkpoint of the same model), whose image tower the tasks were fine-tuned from"
        )


@functools.lru_cache(maxsize=4)
def _context(spec_json: str, cache_root: str) -> EvaluationContext:
    from mergeflow.checkpoints import load_state_dict

    spec = MergeSpec.model_validate_json(spec_json)
    cache = CheckpointCache(cache_root)
    base = load_state_dict(spec.base, cache)
    architecture = resolve_model(spec.model)
    check_text_tower(base, spec.base)
    tasks = prepare_tasks(spec.tasks, architecture, base, cache)
    return EvaluationContext(spec, create_model(architecture, base), tasks, base)


def evaluation_context(spec: MergeSpec, cache: CheckpointCache) -> EvaluationContext:
    """The spec's evaluation context, built once per process (spec, cache)."""
    return _context(spec.model_dump_json(), str(cache.root))
