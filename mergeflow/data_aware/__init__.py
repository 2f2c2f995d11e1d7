"""Merge methods that read samples of each task: AdaMerging, CART + AdaMerging, Concrete
subspace masks, Fisher merging, PLeaS' least squares, RegMean. They run in the pipeline
(which holds each task's data and head), not from ``mergeflow merge``."""

from __future__ import annotations

from mergeflow.data_aware import adamerging, concrete, fisher, pleas, regmean
from mergeflow.data_aware.base import (
    DataAwareInputs,
    DataAwareMethod,
    MergeOutcome,
    TaskSamples,
)

DATA_AWARE: dict[str, DataAwareMethod] = {
    m.name: m
    for m in (*adamerging.METHODS, concrete.CONCRETE, fisher.METHOD, pleas.METHOD, regmean.METHOD)
}

__all__ = ["DATA_AWARE", "DataAwareInputs", "DataAwareMethod", "MergeOutcome", "TaskSamples"]
