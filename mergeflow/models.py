"""CLIP models built from what a spec names, and their zero-shot heads.

A spec's ``model`` is an open_clip config name (``ViT-B-32`` …, or the JSON files in
``mergeflow/model_configs/``, registered under their file names: ``mergeflow-tiny-vit``), a
folder with ``open_clip_config.json``, or a transformers CLIP (a folder or hub id with its
``config.json``), which is built as the open_clip model with the same weights
(:mod:`mergeflow.hf_clip`). Every CLIP is scored through one path, open_clip's. The heads
come from the base model's text tower, computed once per task, and stay frozen, as in the
task-vectors line of work.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.errors import CheckpointError, ParameterError
from mergeflow.storage import atomic_write_bytes

CONFIG_DIR = Path(__file__).parent / "model_configs"


class _DropNotice(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@functools.cache
def _register_configs() -> None:
    import open_clip

    open_clip.add_model_config(CONFIG_DIR)


def known_model_configs() -> list[str]:
    import open_clip

    _register_configs()
    return open_clip.list_models()


@dataclass(frozen=True)
class ClipArchitecture:
    """What a spec's ``model`` names, ready to build: an open_clip config registered by name
    (``model_cfg`` None), or an open_clip model config read from a folder's
    ``open_clip_config.json`` or derived from a transformers ``config.json``, with its
    preprocessing and, when the folder has one, its tokenizer's folder."""

    name: str
    model_cfg: dict | None = None
    preprocess_cfg: dict | None = None
    tokenizer_dir: str | None = None
    hf: bool = False

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "model_cfg": self.model_cfg,
            "preprocess_cfg": self.preprocess_cfg,
            "hf": self.hf,
        }

    @classmethod
    def from_json(cls, data: dict) -> ClipArchitecture:
        return cls(
            data["name"],
            data.get("model_cfg"),
            data.get("preprocess_cfg"),
            None,
            bool(data.get("hf")),
        )

    def open_clip_name(self) -> str:
        """What ``open_clip.create_model`` takes: the registered name, or a ``local-dir:``
        folder holding this config (written once per config under the temp folder)."""
        if self.model_cfg is None:
            return self.name
        body = json.dumps(
            {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg or {}},
            sort_keys=True,
        )
        folder = (
            Path(tempfile.gettempdir())
            / "mergeflow-open-clip-configs"
            / (hashlib.sha256(body.encode()).hexdigest()[:20])
        )
        config = folder / "open_clip_config.json"
        if not config.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(config, body.encode())
        return f"local-dir:{folder}"


_HF_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ParameterError(f"{path}: unreadable ({exc})") from None


def image_tower_heads(model: str) -> int:
    """Attention heads per block of the image tower of the architecture ``model`` names
    (open_clip's width / head_width)."""
    import open_clip

    architecture = resolve_model(model)
    config = architecture.model_cfg or open_clip.get_model_config(architecture.name)
    if not config or "vision_cfg" not in config:
        raise ParameterError(f"{model}: no image tower config; give align.heads")
    vision = config["vision_cfg"]
    return int(vision["width"]) // int(vision.get("head_width", 64))


def is_model_reference(name: str) -> bool:
    """Whether ``name`` could name a model: a registered open_clip config, a local folder,
    or a hub id (``ORG/NAME`` or ``hf://ORG/NAME``); nothing is fetched."""
    return name in known_model_configs() or Path(name).is_dir() or bool(_HF_ID.match(name))


@functools.lru_cache(maxsize=16)
def resolve_model(name: str) -> ClipArchitecture:
    """The architecture ``name`` stands for: a registered open_clip config name, or a folder
    (local, or a hub id through ``huggingface_hub``) with ``open_clip_config.json`` or a
    transformers CLIP ``config.json``."""
    from mergeflow import hf_clip

    if name in known_model_configs():
        return ClipArchitecture(name)
    if Path(name).is_dir():
        folder = Path(name)
    elif _HF_ID.match(name):
        from mergeflow.sources import hub_snapshot

        reference = name if name.startswith("hf://") else f"hf://{name}"
        try:
            folder = Path(hub_snapshot(reference, patterns=["*.json", "*.txt", "*.model"]))
        except CheckpointError as exc:
            raise ParameterError(f"model {name!r}: {exc}") from None
    else:
        raise ParameterError(
            f"unknown model {name!r}: give an open_clip config name, a folder with config.json "
            "or open_clip_config.json, or a hub id ORG/NAME"
        )
    has_tokenizer = any((folder / f).is_file() for f in _TOKENIZER_FILES)
    if (folder / "open_clip_config.json").is_file():
        config = _read_json(folder / "open_clip_config.json")
        if "model_cfg" not in config:
            raise ParameterError(f"{folder / 'open_clip_config.json'}: has no model_cfg")
        return ClipArchitecture(name, config["model_cfg"], config.get("preprocess_cfg"))
    if not (folder / "config.json").is_file():
        raise ParameterError(
            f"model {name!r}: {folder} has neither config.json nor open_clip_config.json"
        )
    model_cfg = hf_clip.open_clip_config(
        _read_json(folder / "config.json"), str(folder / "config.json")
    )
    processor = folder / "preprocessor_config.json"
    preprocess = hf_clip.preprocess_config(
        _read_json(processor) if processor.is_file() else None,
        model_cfg["vision_cfg"]["image_size"],
    )
    if not has_tokenizer and model_cfg["text_cfg"]["vocab_size"] != CLIP_VOCAB_SIZE:
        raise ParameterError(
            f"model {name!r}: no tokenizer files in {folder} and vocab_size "
            f"{model_cfg['text_cfg']['vocab_size']} is not CLIP's {CLIP_VOCAB_SIZE}"
        )
    return ClipArchitecture(
        name, model_cfg, preprocess, str(folder) if has_tokenizer else None, hf=True
    )


CLIP_VOCAB_SIZE = 49408


def _architecture(model: str | ClipArchitecture) -> ClipArchitecture:
    return model if isinstance(model, ClipArchitecture) else resolve_model(model)


def open_clip_folder_config(model: str | ClipArchitecture) -> dict:
    """``open_clip_config.json``'s content for ``model``: what ``local-dir:`` loading reads."""
    import open_clip

    arch = _architecture(model)
    model_cfg = arch.model_cfg
    if model_cfg is None:
        _register_configs()
        model_cfg = open_clip.get_model_config(arch.name)
    built = create_model(arch)
    return {"model_cfg": model_cfg, "preprocess_cfg": dict(built.visual.preprocess_cfg)}


def create_model(model: str | ClipArchitecture, state: Mapping[str, torch.Tensor] | None = None):
    """An open_clip CLIP model of architecture ``model`` (a name :func:`resolve_model`
    knows, or a resolved architecture) in eval mode, holding ``state`` when given: open_clip
    or transformers CLIP names, every key matching (strictly)."""
    import open_clip

    from mergeflow.hf_clip import to_open_clip

    _register_configs()
    arch = _architecture(model)
    # open_clip warns that the model is randomly initialized (or that a config folder has
    # no weights); the weights loaded right below make that untrue, so the notices are
    # dropped here only.
    notice = _DropNotice("No pretrained weights loaded", "Local config loaded, but no CLIP weights")
    logging.getLogger().addFilter(notice)
    try:
        built = open_clip.create_model(arch.open_clip_name(), pretrained=None, load_weights=False)
    finally:
        logging.getLogger().removeFilter(notice)
    if state is None:
        return built.eval()
    missing, unexpected = built.load_state_dict(to_open_clip(state), strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ParameterError(f"state dict does not fit model config {arch.name!r}: {what}")
    return built.eval()


def tokenizer_for(model: str | ClipArchitecture):
    """The tokenizer of ``model``: open_clip's for its configs; a transformers folder's own
    (through open_clip's ``HFTokenizer``) when it has tokenizer files, else CLIP's BPE."""
    import open_clip

    _register_configs()
    arch = _architecture(model)
    if arch.model_cfg is None:
        return open_clip.get_tokenizer(arch.name)
    context = arch.model_cfg["text_cfg"].get("context_length", 77)
    if arch.tokenizer_dir is not None:
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(arch.tokenizer_dir, context_length=context)
    if not arch.hf:
        return open_clip.get_tokenizer(arch.open_clip_name())
    return open_clip.tokenizer.SimpleTokenizer(context_length=context)


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
