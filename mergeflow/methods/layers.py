"""Per-layer recipes: which model (or which blend of models) each transformer layer comes
from, and layer swapping as a preset of them.

``layer_recipe`` takes ``slices``, each a layer range [start, stop) of every stack (an
open_clip tower's ``resblocks``, a decoder's ``model.layers``: the numbered blocks, read
from the key names, :func:`mergeflow.architectures.layer_of`) with a ``blend``, model →
weight (``"0"`` … for the fine-tuned checkpoints in the order given, ``"base"``), and
``other``, the blend of every tensor outside the layers (embeddings, final norm, heads),
which must be given: no source is assumed for them. θ = Σ_m w_m θ_m per key; the weights of
a blend sum to 1, and every layer of every stack is in exactly one slice.

``layer_swap`` (Bandarkar et al., "Layer Swapping for Zero-Shot Cross-Lingual Transfer in
Large Language Models", ICLR 2025; no official code) is the recipe with the bottom
``bottom`` and top ``top`` layers from the model ``outer`` (their language expert), the
middle from ``middle`` (the task expert), and ``transition_bottom`` / ``transition_top``
layers between them a ``transition_weight`` blend of the two (0.5: the average); the
paper's defaults are not known, so the counts are required.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from mergeflow.architectures import layer_of
from mergeflow.errors import ParameterError
from mergeflow.methods.base import MergeMethod, MethodParams

Blend = dict[str, float]


def _read_yaml(value):
    """From the command line, a YAML value: ``--param 'other={"0": 1}'``."""
    if isinstance(value, str):
        import yaml

        return yaml.safe_load(value)
    return value


def _check_blend(blend: Mapping[str, float], where: str) -> Blend:
    blend = {str(k): float(v) for k, v in blend.items()}
    for name in blend:
        if name != "base" and not name.isdigit():
            raise ValueError(f"{where}: {name!r} is not a model: use 0, 1, … or base")
    if not blend or not math.isclose(sum(blend.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"{where}: the weights sum to {sum(blend.values()):g}, not 1")
    return blend


class LayerSlice(MethodParams):
    layers: tuple[int, int | None] = Field(
        description="[start, stop) of every stack's layers (stop null: to the last)"
    )
    blend: Blend = Field(description="model → weight: '0', '1', … (the fine-tuned), 'base'")

    @field_validator("blend")
    @classmethod
    def check_blend(cls, blend: Blend) -> Blend:
        return _check_blend(blend, "blend")

    @model_validator(mode="after")
    def check(self) -> LayerSlice:
        start, stop = self.layers
        if not (start >= 0 and (stop is None or start < stop)):
            raise ValueError(f"layers [{start}, {stop}): give 0 <= start < stop")
        return self


class LayerRecipeParams(MethodParams):
    slices: tuple[LayerSlice, ...] = Field(min_length=1, description="layer ranges and blends")
    other: Blend = Field(description="the blend of every tensor outside the layers")

    @field_validator("slices", "other", mode="before")
    @classmethod
    def read_yaml(cls, value):
        return _read_yaml(value)

    @field_validator("other")
    @classmethod
    def check_other(cls, other: Blend) -> Blend:
        return _check_blend(other, "other")


class LayerSwapParams(MethodParams):
    outer: int = Field(ge=0, description="the model of the bottom and top layers")
    middle: int = Field(ge=0, description="the model of the middle layers")
    bottom: int = Field(ge=0, description="b: layers from outer at the bottom")
    top: int = Field(ge=0, description="u: layers from outer at the top")
    transition_bottom: int = Field(0, ge=0, description="blended layers above the bottom")
    transition_top: int = Field(0, ge=0, description="blended layers below the top")
    transition_weight: float = Field(
        0.5, ge=0.0, le=1.0, description="outer's weight in a transition layer (0.5: average)"
    )
    other: str = Field(
        description="the model of the tensors outside the layers: outer, middle, base or 0, 1, …"
    )

    def recipe(self, num_layers: int) -> list[tuple[int, int, Blend]]:
        """[(start, stop, blend)] over ``num_layers`` layers."""
        b, tb, tu, u = self.bottom, self.transition_bottom, self.transition_top, self.top
        if b + tb + tu + u > num_layers:
            raise ParameterError(
                f"layer_swap: bottom {b} + transition_bottom {tb} + transition_top {tu} + top "
                f"{u} layers is more than the {num_layers} the model has"
            )
        outer, middle = str(self.outer), str(self.middle)
        w = self.transition_weight
        mix = {outer: w, middle: 1.0 - w} if outer != middle else {outer: 1.0}
        parts = [
            (0, b, {outer: 1.0}),
            (b, b + tb, mix),
            (b + tb, num_layers - u - tu, {middle: 1.0}),
            (num_layers - u - tu, num_layers - u, mix),
            (num_layers - u, num_layers, {outer: 1.0}),
        ]
        return [p for p in parts if p[0] < p[1]]

    def other_blend(self) -> Blend:
        name = {"outer": str(self.outer), "middle": str(self.middle)}.get(self.other, self.other)
        return _check_blend({name: 1.0}, "other")


def _stacks(layout: Mapping[str, Any]) -> dict[str, int]:
    """Each stack's number of layers (its largest index + 1)."""
    sizes: dict[str, int] = {}
    for key in layout:
        found = layer_of(key)
        if found:
            sizes[found[0]] = max(sizes.get(found[0], 0), found[1] + 1)
    return sizes


def _plan(layout, slices_of, other: Blend) -> dict:
    """key → blend for every key of ``layout``; ``slices_of(num_layers)`` gives a stack's
    [(start, stop, blend)]. Every layer must be in exactly one slice."""
    sizes = _stacks(layout)
    if not sizes:
        raise ParameterError("no numbered transformer layers in the checkpoint's key names")
    per_stack = {}
    for stack, count in sizes.items():
        blends: list[Blend | None] = [None] * count
        for start, stop, blend in slices_of(count):
            stop = count if stop is None else stop
            if stop > count:
                raise ParameterError(f"layers [{start}, {stop}): {stack} has {count} layers")
            for i in range(start, stop):
                if blends[i] is not None:
                    raise ParameterError(f"layer {i} of {stack} is in two slices")
                blends[i] = blend
        missing = [i for i, b in enumerate(blends) if b is None]
        if missing:
            raise ParameterError(f"layer {missing[0]} of {stack} is in no slice")
        per_stack[stack] = blends
    plan = {}
    for key in layout:
        found = layer_of(key)
        plan[key] = per_stack[found[0]][found[1]] if found else other
    return plan


def plan_recipe(layout, params: LayerRecipeParams) -> dict:
    slices = [(s.layers[0], s.layers[1], s.blend) for s in params.slices]
    return _plan(layout, lambda count: slices, params.other)


def plan_swap(layout, params: LayerSwapParams) -> dict:
    return _plan(layout, params.recipe, params.other_blend())


def blend_tensor(key, finetuned, base, params, plan) -> torch.Tensor:
    """Σ_m w_m θ_m of ``key`` with its blend from the plan."""
    out = None
    for name, weight in plan[key].items():
        if name == "base":
            source = base
        elif int(name) < len(finetuned):
            source = finetuned[int(name)]
        else:
            raise ParameterError(f"model {name} is not one of the {len(finetuned)} fine-tuned")
        out = weight * source if out is None else out.add_(source, alpha=weight)
    return out


def _uses_base(params) -> bool:
    if isinstance(params, LayerSwapParams):
        return params.other == "base"
    blends = [params.other, *(s.blend for s in params.slices)]
    return any("base" in b for b in blends)


LAYER_RECIPE = MergeMethod(
    name="layer_recipe",
    summary="per layer range, which model (or blend of models) supplies the layer",
    reference="mergekit's slices; Bandarkar et al., Layer Swapping, ICLR 2025",
    params=LayerRecipeParams,
    merge_tensor=blend_tensor,
    uses_base=_uses_base,
    plan=plan_recipe,
    elementwise=True,
)

LAYER_SWAP = MergeMethod(
    name="layer_swap",
    summary="bottom and top layers from one model, the middle from another, blended between",
    reference="Bandarkar et al., Layer Swapping for Zero-Shot Cross-Lingual Transfer, ICLR 2025",
    params=LayerSwapParams,
    merge_tensor=blend_tensor,
    uses_base=_uses_base,
    plan=plan_swap,
    elementwise=True,
)

METHODS = (LAYER_RECIPE, LAYER_SWAP)
