"""Checks on checkpoints before they are merged: that each fine-tuned one comes from the
declared base.

A fine-tuned model moves its weights a few percent from where it started; a model from
another base (another init, another pre-training) differs by about as much as the weights
themselves. ‖θ_t − θ₀‖ / ‖θ₀‖ over the floating tensors they share tells the two apart
without reading more than one tensor at a time.
"""

from __future__ import annotations

import math

from mergeflow.checkpoints import CheckpointReader


def relative_distance(base: CheckpointReader, finetuned: CheckpointReader) -> float:
    """‖θ_t − θ₀‖ / ‖θ₀‖ over the floating tensors both hold (float64 sums, streamed)."""
    base_layout, tuned_layout = base.layout(), finetuned.layout()
    difference = norm = 0.0
    for key, (shape, dtype) in base_layout.items():
        if not dtype.is_floating_point or key not in tuned_layout:
            continue
        if tuned_layout[key][0] != shape:
            continue  # the merge itself names shape mismatches
        theta0 = base.get(key).double()
        difference += float((finetuned.get(key).double() - theta0).square().sum())
        norm += float(theta0.square().sum())
    if norm == 0.0:
        return math.inf if difference > 0 else 0.0
    return math.sqrt(difference / norm)


def describe_distances(distances: dict[str, float]) -> str:
    return ", ".join(f"{name} {d:.3f}" for name, d in distances.items())
