"""The registry of merge methods: one small module per method, listed here by name."""

from __future__ import annotations

from mergeflow.errors import ParameterError
from mergeflow.methods import (
    average,
    cart,
    cart_indexed,
    consensus,
    core_space,
    dare,
    iso,
    layers,
    lora_lego,
    opcm,
    pcb,
    task_arithmetic,
    ties,
    tsv,
)
from mergeflow.methods.base import MergeMethod, MethodParams

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        average.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        dare.METHOD,
        tsv.METHOD,
        *iso.METHODS,
        *consensus.METHODS,
        pcb.METHOD,
        cart.METHOD,
        cart_indexed.METHOD,
        opcm.METHOD,
        core_space.METHOD,
        lora_lego.METHOD,
        *layers.METHODS,
    )
}


def find_method(name: str):
    """The data-free (:class:`MergeMethod`), data-aware or routed (Twin-Merging) method
    called ``name``; the error lists the known ones."""
    every = all_methods()
    if name in every:
        return every[name]
    known = ", ".join(sorted(every))
    raise ParameterError(f"unknown merge method {name!r} (known: {known})")


def all_methods() -> dict:
    """Every method by name: data-free, data-aware (they read samples) and routed."""
    from mergeflow.data_aware import DATA_AWARE
    from mergeflow.twin import ROUTED

    return {**METHODS, **DATA_AWARE, **ROUTED}


def get_method(name: str) -> MergeMethod:
    """The data-free method called ``name``; a data-aware one is refused with the reason."""
    from mergeflow.twin import RoutedMethod

    method = find_method(name)
    if isinstance(method, RoutedMethod):
        raise ParameterError(
            f"method {name!r} builds a routed model and trains its router on samples of each "
            "task: run it from a pipeline spec (as a baseline)"
        )
    if not isinstance(method, MergeMethod):
        raise ParameterError(
            f"method {name!r} needs samples of each task: run it from a pipeline spec "
            "(as a baseline or a grid family)"
        )
    return method


__all__ = ["METHODS", "MergeMethod", "MethodParams", "all_methods", "find_method", "get_method"]
