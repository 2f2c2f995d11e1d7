"""open_clip models built from config names and state dicts, and their zero-shot heads.

Architectures are data: besides open_clip's own configs (``ViT-B-32`` …), the JSON files in
``mergeflow/model_configs/`` are registered under their file names (``mergeflow-tiny-vit``).
Only the image tower is merged; the heads come from the base model's text tower, computed
once per task, and stay frozen, as in the task-vectors line of work.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mergeflow.errors import ParameterError

CONFIG_DIR = Path(__file__).parent / "model_configs"


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@functools.cache
def _register_configs() -> None:
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)


def known_model_configs() -> list[str]:
    import open_clip

    _register_configs()
    return open_clip.list_models()


def create_model(config: str, state_dict: Mapping[str, torch.Tensor] | None = None):
    """An open_clip CLIP model of architecture ``config`` in eval mode, holding
    ``state_dict`` when given (strictly: every key must match)."""
    import open_clip

    _register_configs()
    if config not in open_clip.list_models():
        raise ParameterError(f"unknown open_clip model config {config!r}")
    if state_dict is None:
        return open_clip.create_model(config, pretrained=None).eval()
    # open_clip warns that the model is randomly initialized; the weights loaded right
    # below make that untrue, so the notice is dropped here only.
    notice = _DropNotice("No pretrained weights loaded")
    logging.getLogger().addFilter(notice)
    try:
        model = open_clip.create_model(config, pretrained=None)
    finally:
        logging.getLogger().removeFilter(notice)
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ParameterError(f"state dict does not fit model config {config!r}: {what}")
    return model.eval()


def tokenizer_for(config: str):
    import open_clip

    _register_configs()
    return open_clip.get_tokenizer(config)


def image_transform(model):
    """The evaluation transform (resize, crop, RGB, normalize) the model's config implies."""
    import open_clip

    cfg = model.visual.preprocess_cfg
    return open_clip.image_transform(
        model.visual.image_size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std")
    )


@torch.no_grad()
def zero_shot_head(
    model, tokenizer, classes: Sequence[str], templates: Sequence[str], device="cpu"
) -> torch.Tensor:
    """(C, D) float32 classifier: for each class, the mean of its L2-normalized text
    embeddings over ``templates`` (each with ``{c}`` for the class name), renormalized."""
    if not classes or not templates:
        raise ParameterError("a zero-shot head needs class names and prompt templates")
    rows = []
    for name in classes:
        tokens = tokenizer([t.format(c=name) for t in templates]).to(device)
        embeddings = model.encode_text(tokens).float()
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        mean = embeddings.mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def classify(model, head: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Logits (N, C) of preprocessed ``images`` (N, 3, H, W) against a frozen ``head``."""
    features = model.encode_image(images).float()
    features = features / features.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp().float() * features @ head.T
