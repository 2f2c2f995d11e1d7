"""mergekit's YAML merge configurations, for the methods both tools share.

``mergeflow merge --config merge.yml --out OUT`` reads a mergekit config and runs the same
merge with mergeflow's methods, so a recipe can be brought over as it is:

==================  ======================================================================
mergekit            mergeflow
==================  ======================================================================
``task_arithmetic`` ``task_arithmetic``, ``scale`` = the models' ``weight`` (one for all)
``ties``            ``ties`` with ``trim: tensor`` (mergekit trims each tensor), ``density``;
                    ``normalize: true`` (mergekit's default) is the disjoint mean (the weight
                    cancels), ``normalize: false`` the disjoint sum × weight
``linear``          a blend of the models, weights normalized unless ``normalize: false``:
                    ``layer_recipe``, one slice per ``slices`` entry (or one for all layers)
``passthrough``     ``layer_recipe``: each slice's layers from its one source, the slices
                    tiling the layers in order (a recipe that changes the layer count is
                    refused: the output would not match the base's architecture)
==================  ======================================================================

Anything else is refused with the field named, never approximated: per-model weights or
densities that differ (mergeflow's task-vector methods take one scale), other methods and
parameters mergekit has and mergeflow does not. ``dtype`` is noted, not followed: mergeflow
computes in float32 and writes the inputs' dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from mergeflow.errors import ParameterError

SHARED = ("task_arithmetic", "ties", "linear", "passthrough")


@dataclass(frozen=True)
class Translation:
    """A mergekit config as a mergeflow merge."""

    method: str
    params: dict[str, Any]
    base: str | None
    finetuned: list[str]
    notes: list[str] = field(default_factory=list)


def read_config(path: str | os.PathLike) -> Translation:
    """The merge the mergekit config at ``path`` describes; errors name the field."""
    from mergeflow.spec import read_spec_data

    return translate(read_spec_data(str(path)), str(path))


def _fail(source: str, where: str, message: str):
    raise ParameterError(f"{source}: {where}: {message}")


def _model_params(entries, source: str, where: str) -> tuple[list[str], dict[str, Any]]:
    """The models of ``entries`` in order and the parameters they all share."""
    models, shared = [], None
    for i, entry in enumerate(entries or []):
        if not isinstance(entry, dict) or "model" not in entry:
            _fail(source, f"{where}.{i}", "each entry is {model: PATH, parameters: {...}}")
        models.append(str(entry["model"]))
        params = dict(entry.get("parameters") or {})
        if shared is None:
            shared = params
        elif params != shared:
            _fail(source, f"{where}.{i}.parameters",
                  f"{params} differs from the first model's {shared}: mergeflow's methods "
                  "take one weight and density for every model")  # fmt: skip
    return models, shared or {}


def translate(config: dict, source: str = "mergekit config") -> Translation:
    method = config.get("merge_method")
    if method not in SHARED:
        _fail(source, "merge_method",
              f"{method!r} is not one mergeflow shares (it takes {', '.join(SHARED)})")  # fmt: skip
    known = {"merge_method", "base_model", "models", "slices", "parameters", "dtype",
             "tokenizer_source", "tokenizer", "chat_template"}  # fmt: skip
    extra = sorted(set(config) - known)
    if extra:
        _fail(source, extra[0], "not a field mergeflow reads from a mergekit config")
    notes = []
    if config.get("dtype"):
        dtype = config["dtype"]
        notes.append(f"dtype {dtype} not followed: float32 compute, the inputs' dtype out")
    base = str(config["base_model"]) if config.get("base_model") else None
    top = dict(config.get("parameters") or {})
    if method in ("task_arithmetic", "ties"):
        if config.get("slices"):
            _fail(source, "slices", f"{method} with slices is not shared: merge whole models")
        if base is None:
            _fail(source, "base_model", f"{method} needs the base model")
        # the base may be listed among the models too (mergekit skips its zero vector)
        entries = [
            e
            for e in config.get("models") or []
            if not (isinstance(e, dict) and str(e.get("model")) == base)
        ]
        models, params = _model_params(entries, source, "models")
        params = {**top, **params}
        weight = float(params.pop("weight", 1.0))
        normalize = params.pop("normalize", method == "ties")
        if method == "task_arithmetic":
            _refuse_rest(params, source)
            return Translation("task_arithmetic", {"scale": weight}, base, models, notes)
        density = float(params.pop("density", 1.0))
        _refuse_rest(params, source)
        aggregate, scale = ("mean", 1.0) if normalize else ("sum", weight)
        settings = {"density": density, "trim": "tensor", "aggregate": aggregate, "scale": scale}
        return Translation("ties", settings, base, models, notes)
    if config.get("slices"):
        return _slices(config["slices"], method, base, top, source, notes)
    models = [str(e["model"]) for e in config.get("models") or []]
    if method == "passthrough":
        _fail(source, "slices", "passthrough without slices copies one model: nothing to merge")
    weights = _weights(config.get("models"), top, source, "models")
    return _blend_everywhere(weights, models, base, notes)


def _refuse_rest(params: dict, source: str) -> None:
    if params:
        name = sorted(params)[0]
        _fail(source, f"parameters.{name}", "not a parameter mergeflow shares for this method")


def _weights(entries, top, source, where) -> list[float]:
    weights = []
    for i, entry in enumerate(entries or []):
        params = {**top, **dict(entry.get("parameters") or {})}
        extra = sorted(set(params) - {"weight", "normalize"})
        if extra:
            _fail(source, f"{where}.{i}.parameters.{extra[0]}", "not a parameter of linear")
        weights.append(float(params.get("weight", 1.0)))
    normalize = top.get("normalize", True)
    total = sum(weights)
    if normalize:
        if total == 0:
            _fail(source, where, "the weights sum to 0")
        weights = [w / total for w in weights]
    return weights


def _slices(slices, method, base, top, source, notes) -> Translation:
    models: list[str] = []
    parts = []
    for i, entry in enumerate(slices):
        sources = (entry or {}).get("sources") or []
        if not sources:
            _fail(source, f"slices.{i}.sources", "give the slice's sources")
        ranges = {tuple(s.get("layer_range") or ()) for s in sources}
        if len(ranges) != 1 or len(next(iter(ranges))) != 2:
            _fail(source, f"slices.{i}.sources", "every source of a slice takes the same "
                  "layer_range [start, stop] (mergeflow keeps each layer where it is)")  # fmt: skip
        if method == "passthrough" and len(sources) != 1:
            _fail(source, f"slices.{i}.sources", "a passthrough slice has one source")
        where = f"slices.{i}.sources"
        weights = [1.0] if method == "passthrough" else _weights(sources, top, source, where)
        for s in sources:
            if str(s["model"]) not in models:
                models.append(str(s["model"]))
        parts.append((next(iter(ranges)), [(str(s["model"]), w) for s, w in
                                           zip(sources, weights, strict=True)]))  # fmt: skip
    start = 0
    for i, ((first, stop), _) in enumerate(parts):
        if first != start:
            _fail(source, f"slices.{i}.sources.0.layer_range",
                  f"starts at {first}, not {start}: the slices must tile the layers in order "
                  "(a recipe that moves or repeats layers is not shared)")  # fmt: skip
        start = stop
    recipe = [((first, stop), dict(sources)) for (first, stop), sources in parts]
    return _recipe_by_name(recipe, models, base, notes, source)


def _blend_everywhere(weights, models, base, notes) -> Translation:
    """A blend of ``models`` with ``weights`` over every tensor."""
    blend = {str(i): w for i, w in enumerate(weights)}
    params = {"slices": [{"layers": [0, None], "blend": blend}], "other": blend}
    return Translation("layer_recipe", params, base, models, notes)


def _recipe_by_name(parts, models, base, notes, source) -> Translation:
    index = {m: str(i) for i, m in enumerate(models)}
    slices = [
        {"layers": [first, stop], "blend": {index[m]: w for m, w in sources.items()}}
        for (first, stop), sources in parts
    ]
    # mergekit takes the embeddings from the first slice's sources and the final norm and
    # head from the last slice's; one blend outside the layers is shared when they agree
    if slices[0]["blend"] != slices[-1]["blend"]:
        _fail(source, "slices", "the first and last slices take other sources: mergekit "
              "would take the embeddings from the first and the head from the last, which "
              "a recipe does not split")  # fmt: skip
    other = slices[0]["blend"]
    return Translation("layer_recipe", {"slices": slices, "other": other}, base, models, notes)
