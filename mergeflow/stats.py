"""How far to trust a score: intervals for accuracies and paired comparisons of two models
on the same images.

Accuracies on a few hundred images per task are noisy: a winner that beats the runner-up by
three images has not been shown better. :func:`wilson` bounds one task's accuracy;
:func:`paired_bootstrap` bounds the difference of two models' mean normalized accuracy,
resampling each task's images (the same draw for both models, which is what makes it
paired: most of the noise of a split is shared by two models scored on it).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``correct`` / ``total`` (95% by default): unlike the
    normal one it stays within [0, 1] and is sound near 0 and 1."""
    if total <= 0:
        raise ValueError("an interval needs at least one image")
    if not 0 <= correct <= total:
        raise ValueError(f"{correct} correct of {total} images")
    p = correct / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(
    accuracy: Mapping[str, float], sizes: Mapping[str, int], z: float = Z95
) -> tuple[float, float]:
    """A 95% interval of the mean over tasks of per-task accuracies measured on independent
    splits of ``sizes[task]`` images (normal approximation of the mean of proportions)."""
    tasks = list(accuracy)
    mean = sum(accuracy.values()) / len(tasks)
    variance = sum(accuracy[t] * (1 - accuracy[t]) / sizes[t] for t in tasks) / len(tasks) ** 2
    half = z * math.sqrt(variance)
    return max(0.0, mean - half), min(1.0, mean + half)


def pack(correct: np.ndarray) -> str:
    """Per-image correctness (bool, (N,)) as text for a JSON record (one bit per image)."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode()


def unpack(text: str, count: int) -> np.ndarray:
    """What :func:`pack` wrote, as a bool array of ``count`` images."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    if len(bits) < count:
        raise ValueError(f"packed correctness holds {len(bits)} images, not {count}")
    return bits[:count].astype(bool)


@dataclass(frozen=True)
class PairedDifference:
    """Model A minus model B in mean normalized accuracy on the same images: the observed
    difference and its 95% paired-bootstrap interval."""

    difference: float
    low: float
    high: float

    @property
    def distinguishable(self) -> bool:
        """Whether the interval excludes zero (A and B differ beyond the split's noise)."""
        return self.low > 0 or self.high < 0

    def describe(self) -> str:
        return (
            f"{100 * self.difference:+.1f} points (95% interval {100 * self.low:+.1f} to "
            f"{100 * self.high:+.1f})"
        )


def paired_differences(
    correct: Mapping[str, Mapping[str, np.ndarray]],
    pairs: Sequence[tuple[str, str]],
    weights: Mapping[str, float] | None = None,
    draws: int = 2000,
    seed: int = 0,
) -> list[PairedDifference]:
    """For each pair ``(a, b)`` of models in ``correct`` (model → task → per-image
    correctness, bool (N_t,), every model on the same images), a minus b in the mean over
    tasks of ``weights[task] · accuracy`` (normalized accuracy when ``weights`` are 1 / the
    fine-tuned model's accuracy; plain accuracy when None), with a 95% paired-bootstrap
    interval. Each draw resamples every task's images with replacement, the same draw for
    every model."""
    models = sorted({m for pair in pairs for m in pair})
    if not models:
        return []
    missing = [m for m in models if m not in correct]
    if missing:
        raise ValueError(f"no per-image correctness for {missing[0]!r}")
    tasks = list(correct[models[0]])
    rng = np.random.default_rng(seed)
    observed = dict.fromkeys(models, 0.0)
    resampled = {m: np.zeros(draws) for m in models}
    for task in tasks:
        columns = []
        for m in models:
            if task not in correct[m]:
                raise ValueError(f"model {m!r} has no correctness on task {task!r}")
            columns.append(np.asarray(correct[m][task], dtype=bool))
        n = len(columns[0])
        if n == 0 or any(c.shape != (n,) for c in columns):
            raise ValueError(f"task {task!r}: the models were not scored on the same images")
        weight = 1.0 if weights is None else weights[task]
        matrix = np.stack(columns, axis=1).astype(np.float64)  # (N, models)
        # how often each image is drawn, per draw: (draws, N); a draw's accuracy is then
        # a matrix product
        counts = rng.multinomial(n, np.full(n, 1 / n), size=draws)
        means = counts @ matrix / n  # (draws, models)
        for j, m in enumerate(models):
            observed[m] += weight * matrix[:, j].mean() / len(tasks)
            resampled[m] += weight * means[:, j] / len(tasks)
    differences = []
    for a, b in pairs:
        low, high = np.quantile(resampled[a] - resampled[b], [0.025, 0.975])
        differences.append(PairedDifference(observed[a] - observed[b], float(low), float(high)))
    return differences


def paired_bootstrap(
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    weights: Mapping[str, float] | None = None,
    draws: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """:func:`paired_differences` of one pair: model ``a`` minus model ``b``, each given as
    per-image correctness per task."""
    if set(a) != set(b):
        raise ValueError("the two models were scored on different tasks")
    return paired_differences({"a": a, "b": b}, [("a", "b")], weights, draws, seed)[0]
