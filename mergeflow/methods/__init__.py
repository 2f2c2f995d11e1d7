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
    """The data-free (:class:`MergeMethod`) or data-aware method called ``name``; the error
    lists the known ones."""
    from mergeflow.data_aware import DATA_AWARE

    if name in METHODS:
        return METHODS[name]
    if name in DATA_AWARE:
        return DATA_AWARE[name]
    known = ", ".join(sorted([*METHODS, *DATA_AWARE]))
    raise ParameterError(f"unknown merge method {name!r} (known: {known})")


def get_method(name: str) -> MergeMethod:
    """The data-free method called ``name``; a data-aware one is refused with the reason."""
    method = find_method(name)
    if not isinstance(method, MergeMethod):
        raise ParameterError(
            f"method {name!r} needs samples of each task: run it from a pipeline spec "
            "(as a baseline or a grid family)"
        )
    return method


__all__ = ["METHODS", "MergeMethod", "MethodParams", "find_method", "get_method"]
