"""Training for the offline zoo: brief contrastive pretraining, then per-task fine-tuning of
the image tower against a frozen zero-shot head (the task-vectors recipe, in miniature)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def as_model_input(images: np.ndarray, model) -> torch.Tensor:
    """uint8 grayscale (N, H, W) at the model's size → normalized float (N, 3, H, W), the
    same values open_clip's evaluation transform gives for these images."""
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return (x[:, None].expand(-1, 3, -1, -1) - mean) / std


def _shift(batch: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    return torch.roll(batch, shifts=(dy, dx), dims=(2, 3))


def _cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain(
    model,
    tokenizer,
    images: torch.Tensor,
    captions: Sequence[str],
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress=None,
) -> list[float]:
    """Contrastive (CLIP) training on image–caption pairs; returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    tokens = tokenizer(list(captions))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup=max(1, steps // 10))
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        image_features = F.normalize(model.encode_image(_shift(images[idx], gen)), dim=-1)
        text_features = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        # captions repeat within a batch: every pair with the same caption is a positive
        same = (tokens[idx][:, None, :] == tokens[idx][None, :, :]).all(-1).float()
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if progress:
            progress(step, steps, loss.item())
    model.eval()
    return losses


def finetune_image_tower(
    model,
    head: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    seed: int = 0,
    progress=None,
) -> list[float]:
    """Cross-entropy fine-tuning of ``model.visual`` against a frozen zero-shot ``head``."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.visual.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.visual.parameters(), lr=lr, weight_decay=weight_decay)
    scale = model.logit_scale.exp().detach()
    model.visual.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup=max(1, steps // 10))
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        features = F.normalize(model.encode_image(_shift(images[idx], gen)), dim=-1)
        loss = F.cross_entropy(scale * features @ head.T, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress:
            progress(step, steps, loss.item())
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model, head: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, batch_size=512):
    correct = 0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        features = F.normalize(model.encode_image(x).float(), dim=-1)
        correct += (features @ head.T).argmax(1).eq(labels[start : start + batch_size]).sum().item()
    return correct / len(images)


__all__ = ["accuracy", "as_model_input", "finetune_image_tower", "pretrain"]
