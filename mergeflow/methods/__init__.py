"""The registry of merge methods: one small module per method, listed here by name."""

from __future__ import annotations

from mergeflow.errors import ParameterError
from mergeflow.methods import (
    average,
    cart,
    cart_indexed,
    consensus,
    dare,
    iso,
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
    )
}


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; the error lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ParameterError(f"unknown merge method {name!r} (known: {known})") from None


__all__ = ["METHODS", "MergeMethod", "MethodParams", "get_method"]
