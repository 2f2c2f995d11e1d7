"""PEFT LoRA adapters as fine-tuned checkpoints, and merged deltas written back as adapters.

A LoRA adapter (Hu et al. 2022) stores, per target module, factors A (r × in) and B
(out × r); the fine-tuned weight is

    W_t = W_0 + ΔW_t,    ΔW_t = s · B A,    s = lora_alpha / r   (rsLoRA: lora_alpha / √r)

with ``r`` and ``lora_alpha`` per module when ``rank_pattern`` / ``alpha_pattern`` say so, and
ΔW transposed for ``fan_in_fan_out`` layers (GPT-2's Conv1D). :class:`LoraReader` presents
an adapter as the whole fine-tuned model W_0 + ΔW over its base, so every merge method sees
the dense task vectors ΔW_t, never the factors: merging A and B factor by factor would merge
something else entirely. Adapter variants whose weights are not W_0 + s·BA (DoRA, trained
LoRA biases, modules_to_save, embedding or convolution LoRA, …) are refused.

:func:`save_lora_adapter` writes a merged model's delta on the adapters' target modules as a
PEFT adapter folder: per module the rank-R truncated SVD, B = U √S, A = √S Vᵀ, lora_alpha = R
(a module with fewer than R directions gets its full rank through ``rank_pattern``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.checkpoints import CheckpointReader
from mergeflow.errors import CheckpointError, ParameterError
from mergeflow.statedict import Layout
from mergeflow.svd import truncated_svd

_FACTOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[\w-]+))?"
    r"\.weight$"
)
# config settings under which an adapter's weight is not W_0 + s·BA: refused when set
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "alora_invocation_tokens",
    "use_bdlora",
    "use_qalora",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "arrow_config",
)


def _pattern_value(patterns: Mapping[str, object], module: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern: the first key that matches the end of
    the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraTarget:
    """One adapted module: its base weight's key, factor keys, scale and orientation."""

    weight_key: str
    a_key: str
    b_key: str
    scale: float
    transposed: bool


@dataclass(frozen=True)
class LoraAdapter:
    """A parsed PEFT LoRA adapter (config + factor file)."""

    name: str
    config: dict
    targets: dict[str, LoraTarget]  # base weight key → target
    factors: CheckpointReader

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def rank(self, key: str) -> int:
        return self.factors.layout()[self.targets[key].a_key][0][0]

    def factors_of(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') with ΔW = B' A' in the base weight's orientation, float32: the scale
        folded into B (and both transposed and swapped for fan_in_fan_out layers)."""
        target = self.targets[key]
        a = self.factors.get(target.a_key).to(torch.float32)
        b = self.factors.get(target.b_key).to(torch.float32) * target.scale
        return (a.T.contiguous(), b.T.contiguous()) if target.transposed else (b, a)

    def delta(self, key: str) -> torch.Tensor:
        """ΔW of the module whose base weight is ``key``, float32 (out × in, or in × out
        for fan_in_fan_out layers, the base weight's own orientation)."""
        target = self.targets[key]
        a = self.factors.get(target.a_key).to(torch.float32)
        b = self.factors.get(target.b_key).to(torch.float32)
        delta = (b @ a).mul_(target.scale)
        return delta.T if target.transposed else delta


def read_adapter_config(path: str | os.PathLike, name: str) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{name}: unreadable adapter_config.json ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{name}: adapter_config.json is not a JSON object")
    return config


def parse_adapter(config: dict, factors: CheckpointReader, name: str) -> LoraAdapter:
    """The adapter's targets from its config and factor keys; anything that is not plain
    LoRA is refused with the setting or key at fault."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{name}: a {peft_type} adapter; mergeflow reads LoRA adapters")
    for setting in _UNSUPPORTED:
        if config.get(setting):
            raise CheckpointError(
                f"{name}: adapter_config.json sets {setting}={config[setting]!r}: its weights "
                "are not W + (alpha/r)·B·A, and mergeflow refuses to approximate them"
            )
    if config.get("bias", "none") != "none":
        raise CheckpointError(
            f"{name}: adapter_config.json sets bias={config['bias']!r} (trained biases are "
            "not read; refused rather than dropped)"
        )
    try:
        default_r, default_alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{name}: adapter_config.json lacks a valid r and lora_alpha"
        ) from None
    rs = bool(config.get("use_rslora"))
    pairs: dict[str, dict[str, str]] = {}
    for key in factors.layout():
        match = _FACTOR.match(key)
        if match is None:
            raise CheckpointError(
                f"{name}: tensor {key!r} is not a LoRA factor (lora_A/lora_B); embedding, "
                "convolution and other adapter tensors are not read"
            )
        pairs.setdefault(match["module"], {})[match["which"]] = key
    if not pairs:
        raise CheckpointError(f"{name}: the adapter holds no LoRA factors")
    layout = factors.layout()
    targets = {}
    for module, keys in pairs.items():
        if set(keys) != {"A", "B"}:
            raise CheckpointError(f"{name}: module {module!r} has lora_{set(keys).pop()} only")
        (a_shape, _), (b_shape, _) = layout[keys["A"]], layout[keys["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise CheckpointError(
                f"{name}: module {module!r}: lora_A {a_shape} and lora_B {b_shape} are not "
                "the factors of a linear LoRA"
            )
        r = a_shape[0]
        declared_r = int(_pattern_value(config.get("rank_pattern") or {}, module, default_r))
        if declared_r != r:
            raise CheckpointError(
                f"{name}: module {module!r} has rank {r} but adapter_config.json says {declared_r}"
            )
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, default_alpha))
        scale = alpha / math.sqrt(r) if rs else alpha / r
        weight_key = f"{module}.weight"
        targets[weight_key] = LoraTarget(
            weight_key, keys["A"], keys["B"], scale, bool(config.get("fan_in_fan_out"))
        )
    return LoraAdapter(name, config, targets, factors)


class LoraReader(CheckpointReader):
    """An adapter seen as its whole fine-tuned model: the base's tensors, with W_0 + ΔW on
    every target (float32, so the task vector is not rounded into the base's dtype; the
    layout keeps the base's dtype, which merged tensors are cast back to)."""

    def __init__(self, adapter: LoraAdapter, base: CheckpointReader):
        self.adapter = adapter
        self.base = base
        self.name = adapter.name
        self.format = "PEFT LoRA adapter"
        layout = base.layout()
        for key, target in adapter.targets.items():
            if key not in layout:
                raise CheckpointError(
                    f"{adapter.name}: adapts {key.removesuffix('.weight')!r}, which the base "
                    f"{base.name} does not have (no tensor {key!r})"
                )
            shape = layout[key][0]
            a_shape = adapter.factors.layout()[target.a_key][0]
            b_shape = adapter.factors.layout()[target.b_key][0]
            out_in = (b_shape[0], a_shape[1])
            expected = tuple(reversed(out_in)) if target.transposed else out_in
            if tuple(shape) != expected:
                raise CheckpointError(
                    f"{adapter.name}: {key!r}: the adapter's ΔW is {expected} but the base "
                    f"{base.name} holds {tuple(shape)}"
                )
        self._layout = layout

    def layout(self) -> Layout:
        return dict(self._layout)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.adapter.targets:
            return self.base.get(key)
        return self.base.get(key).to(torch.float32).add_(self.adapter.delta(key))

    def low_rank_factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.adapter.factors_of(key) if key in self.adapter.targets else None

    def close(self) -> None:
        self.adapter.factors.close()


def check_compatible(adapters: Sequence[LoraAdapter]) -> None:
    """Adapters merged together must adapt one base model on the same target modules."""
    first = adapters[0]
    for other in adapters[1:]:
        if first.base_model and other.base_model and first.base_model != other.base_model:
            raise ParameterError(
                f"LoRA adapters for different bases: {first.name} adapts {first.base_model}, "
                f"{other.name} adapts {other.base_model}"
            )
        if set(first.targets) != set(other.targets):
            only = sorted(set(first.targets) ^ set(other.targets))[0].removesuffix(".weight")
            raise ParameterError(
                f"LoRA adapters on different target modules: {first.name} and {other.name} "
                f"differ at {only!r}"
            )


def save_lora_adapter(
    merged: Mapping[str, torch.Tensor],
    base: CheckpointReader,
    adapters: Sequence[LoraAdapter],
    rank: int,
    folder: str,
    card: str,
) -> dict:
    """Write ``merged − base`` on the adapters' targets as a PEFT adapter folder of rank
    ``rank``; every other tensor of ``merged`` must equal the base's (a LoRA cannot carry
    it). Returns the kept share of each delta's squared norm, the worst first."""
    from mergeflow.outputs import write_folder_files

    if rank < 1:
        raise ParameterError(f"--rank must be at least 1, got {rank}")
    template = adapters[0]
    factors: dict[str, torch.Tensor] = {}
    kept: dict[str, float] = {}
    smaller: dict[str, int] = {}  # modules whose matrices have fewer than ``rank`` directions
    for key, target in template.targets.items():
        delta = merged[key].to(torch.float32) - base.get(key).to(torch.float32)
        if target.transposed:
            delta = delta.T
        k = min(rank, *delta.shape)
        f = truncated_svd(delta.contiguous(), k)
        root = f.s.sqrt()
        module = key.removesuffix(".weight")
        if k < rank:
            smaller[re.escape(module)] = k
        factors[f"base_model.model.{module}.lora_A.weight"] = (root[:, None] * f.vh).contiguous()
        factors[f"base_model.model.{module}.lora_B.weight"] = (f.u * root).contiguous()
        total = float(delta.square().sum())
        kept[module] = float(f.s.square().sum()) / total if total > 0 else 1.0
    for key, tensor in merged.items():
        if key in template.targets or not tensor.is_floating_point():
            continue
        if not torch.equal(tensor, base.get(key).to(tensor.dtype)):
            raise ParameterError(
                f"the merge changed {key!r}, which no LoRA target holds: write a full model "
                "(--out-format full) instead of an adapter"
            )
    config = {
        **template.config,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        # PEFT's per-module overrides, scale α/r = 1 everywhere
        "rank_pattern": smaller,
        "alpha_pattern": dict(smaller),
    }
    write_folder_files(
        folder,
        {"adapter_model.safetensors": factors},
        {"adapter_config.json": json.dumps(config, indent=2), "README.md": card},
    )
    return dict(sorted(kept.items(), key=lambda item: item[1]))
