"""Choosing the merged model: each family's best grid point on the selection splits, and
the best of those that are one merged model.

The tie rule: equal mean normalized accuracy goes to CART, then to the lower rank ratio,
then to the smaller scale (cheaper to store, closer to weight averaging).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergeflow.candidates import AnyCandidate, Candidate
from mergeflow.evaluation import summarize


@dataclass(frozen=True)
class GridPoint:
    """A grid point scored on the selection splits. ``summary``: per-task ``accuracy`` and
    ``normalized`` accuracy, ``mean_accuracy``, ``mean_normalized``."""

    family: str
    candidate: AnyCandidate
    summary: Mapping

    @property
    def mean_normalized(self) -> float:
        return self.summary["mean_normalized"]

    def record(self) -> dict:
        """The point as results, charts and the tracking store show it: method, params,
        label, family, each parameter on its own, and the summary."""
        candidate = self.candidate.record()
        return {**candidate, "family": self.family, **candidate["params"], **self.summary}


def scored_point(
    family: str, candidate: Candidate, scores: Mapping[str, float], finetuned: Mapping
) -> GridPoint:
    """``candidate``'s selection scores summarized against the fine-tuned models'."""
    return GridPoint(family, candidate, summarize(scores, finetuned))


def preference(point: GridPoint) -> tuple:
    """What :func:`pick_best` maximizes (see the module's tie rule)."""
    settings = point.candidate.settings
    return (
        point.mean_normalized,
        point.candidate.method == "cart",
        -settings.get("rank_ratio", 0.0),
        -settings.get("scale", 0.0),
    )


def pick_best(points: Sequence[GridPoint]) -> GridPoint:
    if not points:
        raise ValueError("no grid points to choose from")
    return max(points, key=preference)


@dataclass(frozen=True)
class Selection:
    """Each family's best point (all go to the report) and the winner: the best of those
    that are one merged model (a per-task family's best is reported, never registered)."""

    family_best: Mapping[str, GridPoint]
    winner: GridPoint


def select(points: Sequence[GridPoint]) -> Selection:
    families = list(dict.fromkeys(p.family for p in points))
    family_best = {f: pick_best([p for p in points if p.family == f]) for f in families}
    mergeable = [p for p in family_best.values() if not p.candidate.per_task]
    if not mergeable:
        raise ValueError("every family builds one model per task: nothing to register")
    return Selection(family_best, pick_best(mergeable))
