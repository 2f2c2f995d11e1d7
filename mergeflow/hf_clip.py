"""Hugging Face ``CLIPModel`` weights and config as open_clip's, exactly.

mergeflow scores every CLIP through one path, open_clip's model. A transformers CLIP is the
same network under other names: attention's q, k and v projections are three matrices where
open_clip's ``nn.MultiheadAttention`` has one ``in_proj_weight`` (their concatenation), the
projections are stored transposed, and the rest is renaming. :func:`to_open_clip` and
:func:`from_open_clip` convert state dicts both ways (each the other's inverse, tensor for
tensor); :func:`open_clip_config` turns a ``CLIPConfig`` (``config.json``) into open_clip's
model config. ``tests/test_formats.py`` checks the converted model's logits against
transformers' own on the same weights.

Merging happens on the checkpoints' own names: a CART merge of an HF CLIP factorizes q, k
and v apart, as FusionBench's HF CLIP models are merged; only scoring converts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from mergeflow.errors import ParameterError

_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_FIXED = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {
    "visual_projection.weight": "visual.proj",
    "text_projection.weight": "text_projection",
}
_TOWER = {"vision_model": "visual.transformer", "text_model": "transformer"}
_LAYER = re.compile(
    r"^(?P<tower>vision_model|text_model)\.encoder\.layers\.(?P<i>\d+)\.(?P<rest>.+)\.(?P<p>weight|bias)$"
)
_QKV = re.compile(r"^self_attn\.(q|k|v)_proj$")
_DROPPED = re.compile(r"(^|\.)position_ids$")  # a buffer older transformers saved


def is_hf_clip(keys: Iterable[str]) -> bool:
    """Whether the keys are a transformers CLIP's (``vision_model.``/``text_model.``)."""
    return any(k.startswith(("vision_model.", "text_model.")) for k in keys)


def is_open_clip_clip(keys: Iterable[str]) -> bool:
    """Whether the keys are an open_clip CLIP's (an image tower under ``visual.``)."""
    return any(k == "visual.conv1.weight" for k in keys)


def to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's state dict for a transformers CLIP state dict (CLIPModel, or one tower:
    CLIPVisionModel(WithProjection), CLIPTextModel); open_clip state dicts pass unchanged.
    A key with no open_clip counterpart is an error naming it."""
    if not is_hf_clip(state):
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key in _FIXED:
            out[_FIXED[key]] = tensor
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = tensor.T.contiguous()
        elif _DROPPED.search(key):
            continue
        elif (layer := _LAYER.match(key)) is not None:
            prefix = f"{_TOWER[layer['tower']]}.resblocks.{layer['i']}"
            qkv_match = _QKV.match(layer["rest"])
            if qkv_match:
                qkv.setdefault((prefix, layer["p"]), {})[qkv_match[1]] = tensor
            elif layer["rest"] in _BLOCK:
                out[f"{prefix}.{_BLOCK[layer['rest']]}.{layer['p']}"] = tensor
            else:
                raise ParameterError(f"key {key!r}: not part of a CLIP mergeflow can convert")
        else:
            raise ParameterError(f"key {key!r}: not part of a CLIP mergeflow can convert")
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ParameterError(f"{prefix}: attention {kind} lacks one of q, k, v")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"{prefix}.attn.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def from_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers names for an open_clip CLIP state dict: the inverse of
    :func:`to_open_clip` (in_proj split into q, k, v; projections transposed back)."""
    fixed = {v: k for k, v in _FIXED.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK.items()}
    towers = {v: k for k, v in _TOWER.items()}
    pattern = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)$")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in fixed:
            out[fixed[key]] = tensor
        elif key in transposed:
            out[transposed[key]] = tensor.T.contiguous()
        elif key == "attn_mask":
            continue
        elif (match := pattern.match(key)) is not None:
            prefix = f"{towers[match[1]]}.encoder.layers.{match[2]}"
            rest = match[3]
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                    out[f"{prefix}.self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            module, _, kind = rest.rpartition(".")
            if module not in block:
                raise ParameterError(f"key {key!r}: has no transformers CLIP counterpart")
            out[f"{prefix}.{block[module]}.{kind}"] = tensor
        else:
            raise ParameterError(f"key {key!r}: has no transformers CLIP counterpart")
    return out


def open_clip_config(config: Mapping, name: str = "config.json") -> dict:
    """open_clip's model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``)
    for a transformers ``CLIPConfig`` dict; what open_clip's CLIP cannot express the same
    way (another activation, layer-norm epsilon per tower) is refused, naming the field."""
    if config.get("model_type") != "clip":
        raise ParameterError(
            f"{name}: model_type {config.get('model_type')!r}; mergeflow scores CLIP models "
            "(model_type 'clip') or open_clip configs"
        )
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}

    def field(section: Mapping, key: str, default, where: str):
        value = section.get(key, default)
        if value is None:
            raise ParameterError(f"{name}: {where}.{key} is missing")
        return value

    acts = {
        field(vision, "hidden_act", "quick_gelu", "vision_config"),
        field(text, "hidden_act", "quick_gelu", "text_config"),
    }
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise ParameterError(
            f"{name}: hidden_act {sorted(acts)}: open_clip's CLIP has quick_gelu or gelu, the "
            "same in both towers"
        )
    eps = {float(vision.get("layer_norm_eps", 1e-5)), float(text.get("layer_norm_eps", 1e-5))}
    if len(eps) != 1:
        raise ParameterError(f"{name}: layer_norm_eps differs between the towers")
    norm = None if eps == {1e-5} else {"eps": eps.pop()}

    def tower(section, where, hidden_default, heads_default, layers_default):
        width = int(field(section, "hidden_size", hidden_default, where))
        heads = int(field(section, "num_attention_heads", heads_default, where))
        mlp = int(field(section, "intermediate_size", 4 * width, where))
        if width % heads:
            raise ParameterError(f"{name}: {where}.hidden_size is not a multiple of its heads")
        return (
            width,
            heads,
            mlp / width,
            int(field(section, "num_hidden_layers", layers_default, where)),
        )

    v_width, v_heads, v_mlp, v_layers = tower(vision, "vision_config", 768, 12, 12)
    t_width, t_heads, t_mlp, t_layers = tower(text, "text_config", 512, 8, 12)
    vision_cfg = {
        "image_size": int(field(vision, "image_size", 224, "vision_config")),
        "patch_size": int(field(vision, "patch_size", 32, "vision_config")),
        "width": v_width,
        "layers": v_layers,
        "head_width": v_width // v_heads,
        "mlp_ratio": v_mlp,
    }
    text_cfg = {
        "context_length": int(field(text, "max_position_embeddings", 77, "text_config")),
        "vocab_size": int(field(text, "vocab_size", 49408, "text_config")),
        "width": t_width,
        "heads": t_heads,
        "layers": t_layers,
        "mlp_ratio": t_mlp,
    }
    if norm:
        vision_cfg["norm_kwargs"] = text_cfg["norm_kwargs"] = norm
    return {
        "embed_dim": int(config.get("projection_dim", 512)),
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
        "quick_gelu": acts == {"quick_gelu"},
    }


def preprocess_config(processor: Mapping | None, image_size: int) -> dict:
    """open_clip's preprocess config from a ``preprocessor_config.json`` dict (CLIP's
    defaults without one): mean, std, bicubic resize of the short side, centre crop."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    processor = processor or {}
    return {
        "size": image_size,
        "mean": tuple(processor.get("image_mean") or OPENAI_DATASET_MEAN),
        "std": tuple(processor.get("image_std") or OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
