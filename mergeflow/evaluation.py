"""Score merged candidates on every task: zero-shot heads and prepared images, built once.

Everything that does not depend on the candidate (each task's head from the base model's
text tower, the decoded and preprocessed images of each split) is computed once in
:func:`prepare_tasks`; scoring a candidate is then one image-tower forward per batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergeflow.data import PreparedSplit, prepare_split
from mergeflow.errors import ParameterError
from mergeflow.models import classify, image_transform, tokenizer_for, zero_shot_head
from mergeflow.spec import TaskSpec
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
def accuracy(
    model, task: PreparedTask, split: str = SELECTION, batch_size: int = 256, device="auto"
) -> float:
    """Top-1 accuracy of ``model`` on one prepared split."""
    device = resolve_device(device)
    model = model.to(device).eval()
    data = task.splits[split]
    head = task.head.to(device)
    correct = 0
    for start in range(0, len(data.labels), batch_size):
        images = data.images[start : start + batch_size].to(device)
        predicted = classify(model, head, images).argmax(1).cpu()
        correct += int((predicted == data.labels[start : start + batch_size]).sum())
    return correct / len(data.labels)


def score_all(
    model, tasks: Sequence[PreparedTask], split: str = SELECTION, batch_size=256, device="auto"
) -> dict[str, float]:
    return {t.name: accuracy(model, t, split, batch_size, device) for t in tasks}


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
