"""Choosing the merged model: each family's best grid point on the selection splits, and
the best of those that are one merged model.

The tie rule: equal mean normalized accuracy goes to CART, then to the lower rank ratio,
then to the smaller scale (cheaper to store, closer to weight averaging). Given the
images' per-image correctness (:class:`Evidence`), "equal" means "not distinguishable": a
family's best that a paired bootstrap over the selection images cannot tell from the top
one is a tie, and the tie rule chooses among them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mergeflow.candidates import AnyCandidate, Candidate
from mergeflow.evaluation import summarize
from mergeflow.stats import PairedDifference, paired_differences


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
class Evidence:
    """Per-image correctness on the selection splits (label → task → bool (N_t,)) of the
    models to compare, the weight of each task in the mean (1 / its fine-tuned model's
    accuracy, so that differences are in mean normalized accuracy) and the label of weight
    averaging among them, if it is there."""

    correct: Mapping[str, Mapping[str, np.ndarray]]
    weights: Mapping[str, float] | None  # None: plain accuracy (no fine-tuned scores)
    average: str | None = None


@dataclass(frozen=True)
class Versus:
    """The winner against another model: winner minus ``other`` on the selection images."""

    other: str
    difference: PairedDifference


@dataclass(frozen=True)
class Selection:
    """Each family's best point (all go to the report) and the winner: the best of those
    that are one merged model (a per-task family's best is reported, never registered).
    With evidence: the winner against the runner-up and against weight averaging, and
    whether the tie rule chose it over a top point it could not be told from."""

    family_best: Mapping[str, GridPoint]
    winner: GridPoint
    runner_up: Versus | None = None
    versus_average: Versus | None = None
    by_tie_rule: bool = False
    edges: tuple[tuple[str, str], ...] = field(default=())  # (family, note)

    def why(self) -> str:
        """One line: why this winner."""
        label = self.winner.candidate.label
        if self.runner_up is None:
            return f"{label}: best mean normalized accuracy on the selection splits"
        versus = self.runner_up
        if self.by_tie_rule:
            return (
                f"{label}: not distinguishable from the top point {versus.other} "
                f"({versus.difference.describe()}), preferred by the tie rule (CART, then "
                "lower rank, then smaller scale)"
            )
        verdict = (
            "better beyond the selection images' noise"
            if versus.difference.distinguishable
            else "not distinguishable from it"
        )
        return f"{label}: {versus.difference.describe()} over {versus.other}, {verdict}"

    def warnings(self) -> list[str]:
        """What a user should check: a winner not shown better than weight averaging, and
        the winner's point on an edge of its grid."""
        notes = []
        average = self.versus_average
        if average is not None and not (
            average.difference.distinguishable and average.difference.difference > 0
        ):
            notes.append(
                f"{self.winner.candidate.label} is not shown better than weight averaging "
                f"({average.difference.describe()}): more selection images would tell"
            )
        return notes + [note for family, note in self.edges if family == self.winner.family]

    def other_edges(self) -> list[str]:
        """The edge notes of the other families' best points (their rows in the report)."""
        return [note for family, note in self.edges if family != self.winner.family]

    def record(self) -> dict:
        """As results and ``--json`` show it."""

        def versus(v: Versus | None):
            if v is None:
                return None
            d = v.difference
            return {
                "other": v.other,
                "difference": d.difference,
                "interval": [d.low, d.high],
                "distinguishable": d.distinguishable,
            }

        return {
            "winner": self.winner.candidate.label,
            "why": self.why(),
            "by_tie_rule": self.by_tie_rule,
            "runner_up": versus(self.runner_up),
            "versus_average": versus(self.versus_average),
            "warnings": self.warnings(),
            "other_edges": self.other_edges(),
        }


def tie_preference(point: GridPoint) -> tuple:
    """What the tie rule maximizes among points it cannot tell apart: CART, lower rank,
    smaller scale; between other methods (whose scales do not compare) the higher score."""
    settings = point.candidate.settings
    cart = point.candidate.method == "cart"
    return (
        cart,
        -settings.get("rank_ratio", 0.0) if cart else 0.0,
        -settings.get("scale", 0.0) if cart else 0.0,
        point.mean_normalized,
    )


def grid_edges(
    points: Sequence[GridPoint], chosen: Mapping[str, GridPoint]
) -> tuple[tuple[str, str], ...]:
    """``(family, note)`` for each chosen point (family → point) whose searched parameter
    sits at the largest or smallest value its family searched: the best may lie beyond."""
    notes = []
    for family, point in chosen.items():
        searched: dict[str, set] = {}
        for p in points:
            if p.family == family:
                for name, value in p.candidate.settings.items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        searched.setdefault(name, set()).add(value)
        for name, values in searched.items():
            value = point.candidate.settings.get(name)
            if len(values) < 2 or value is None:
                continue
            if name == "rank_ratio" and value >= 1.0:
                continue  # full rank: nothing lies beyond
            where = (
                "largest" if value == max(values) else "smallest" if value == min(values) else ""
            )
            if where:
                field_name = f"grid.{name}s" if family == "cart" else f"search.{name}"
                where_to = "" if family == "cart" else f" of family {family!r}"
                notes.append(
                    (
                        family,
                        f"{family}: {name} {value} is the {where} searched: extend "
                        f"{field_name}{where_to}",
                    )
                )
    return tuple(notes)


def select(points: Sequence[GridPoint], evidence: Evidence | None = None) -> Selection:
    """Each family's best and the winner (see the module's tie rule); with ``evidence``
    (the mergeable family bests' correctness, keyed by label) the winner is compared with
    the runner-up and weight averaging, and ties are decided by the tie rule."""
    families = list(dict.fromkeys(p.family for p in points))
    family_best = {f: pick_best([p for p in points if p.family == f]) for f in families}
    mergeable = [p for p in family_best.values() if not p.candidate.per_task]
    if not mergeable:
        raise ValueError("every family builds one model per task: nothing to register")
    top = pick_best(mergeable)
    edges = grid_edges(points, family_best)
    if evidence is None:
        return Selection(family_best, top, edges=edges)
    labels = [p.candidate.label for p in mergeable]
    missing = [label for label in labels if label not in evidence.correct]
    if missing:
        raise ValueError(f"no per-image correctness for {missing[0]!r}")
    others = [p for p in mergeable if p is not top]
    pairs = [(top.candidate.label, p.candidate.label) for p in others]
    found = paired_differences(evidence.correct, pairs, evidence.weights)
    ties = [p for p, d in zip(others, found, strict=True) if not d.distinguishable]
    winner = max([top, *ties], key=tie_preference)
    by_tie_rule = winner is not top
    # the winner against the runner-up (the top point if the tie rule passed it over, else
    # the best of the rest) and against weight averaging
    rival = top if by_tie_rule else max(others, key=preference, default=None)
    me = winner.candidate.label
    wanted = {}
    if rival is not None:
        wanted["runner_up"] = (me, rival.candidate.label)
    if evidence.average is not None and evidence.average != me:
        wanted["average"] = (me, evidence.average)
    found = paired_differences(evidence.correct, list(wanted.values()), evidence.weights)
    found = dict(zip(wanted, found, strict=True))
    runner_up = Versus(rival.candidate.label, found["runner_up"]) if "runner_up" in found else None
    versus_average = Versus(evidence.average, found["average"]) if "average" in found else None
    return Selection(family_best, winner, runner_up, versus_average, by_tie_rule, edges)
