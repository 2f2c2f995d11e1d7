"""What a spec asks a run to score, as typed candidates: pure, no I/O.

:func:`make_plan` turns a :class:`~mergeflow.spec.MergeSpec` into a :class:`Plan`: the grid's
families (CART's rank × scale grid first, then every searched method family), the baselines
and references scored on the report split, and notes on choices the user should see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mergeflow.candidates import (
    Candidate,
    DataAware,
    FixedMethod,
    PerTask,
    Reference,
    Routed,
    cart_point,
    reference,
)
from mergeflow.spec import MergeSpec, MethodSpec

CART_FAMILY = "cart"
# the parameters CART's factors rebuild a point from; any other (include, exclude, ...)
# needs the method run over the checkpoints
CART_POINT_PARAMS = frozenset({"rank_ratio", "scale"})


def is_data_aware(method: str) -> bool:
    """Whether ``method`` reads samples of the tasks (AdaMerging, Fisher, RegMean, ...)."""
    from mergeflow.data_aware import DataAwareMethod
    from mergeflow.methods import find_method

    return isinstance(find_method(method), DataAwareMethod)


def candidate_of(method: MethodSpec, largest_rank_ratio: float) -> tuple[Candidate, str | None]:
    """The candidate that a method spec names, and a note when it is CART that cannot be
    rebuilt from the grid's factors (so it is merged by streaming, which is slower)."""
    from mergeflow.kernels import DEFAULT_RANK_RATIO
    from mergeflow.methods import find_method
    from mergeflow.twin import ROUTED

    label = method.name
    if method.method in ROUTED:
        return Routed(name=method.method, params=method.params, label=label), None
    if is_data_aware(method.method):
        return DataAware(name=method.method, params=method.params, label=label), None
    if find_method(method.method).per_task:
        return PerTask(name=method.method, params=method.params, label=label), None
    if method.method == "cart":
        rank_ratio = method.params.get("rank_ratio", DEFAULT_RANK_RATIO)
        extra = sorted(set(method.params) - CART_POINT_PARAMS)
        if not extra and rank_ratio <= largest_rank_ratio:
            return cart_point(rank_ratio, method.params.get("scale", 1.0), label), None
        why = (
            f"it sets {', '.join(extra)}"
            if extra
            else f"its rank ratio {rank_ratio} is beyond the grid's largest {largest_rank_ratio}"
        )
        note = f"{label}: merged over the checkpoints, not from the grid's CART factors ({why})"
        return FixedMethod(name="cart", params=method.params, label=label), note
    return FixedMethod(name=method.method, params=method.params, label=label), None


@dataclass(frozen=True)
class Family:
    """A searched method: its name in tables and its grid points."""

    name: str
    points: tuple[Candidate, ...]


@dataclass(frozen=True)
class Plan:
    families: tuple[Family, ...]
    baselines: tuple[Candidate, ...]
    references: tuple[Reference, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def grid(self) -> list[tuple[str, Candidate]]:
        """Every grid point with its family's name, in the families' order."""
        return [(f.name, point) for f in self.families for point in f.points]

    @property
    def data_aware(self) -> list[DataAware]:
        """The data-aware candidates of the grid and the baselines, each once (they are
        costly: each one adapts before anything scores it)."""
        unique: dict[str, DataAware] = {}
        for candidate in [c for _, c in self.grid] + list(self.baselines):
            if isinstance(candidate, DataAware):
                recipe = (candidate.name, sorted(candidate.params.items()))
                unique.setdefault(repr(recipe), candidate)
        return list(unique.values())

    def best_routed(self, comparison: dict[str, dict]) -> Routed | None:
        """The routed baseline (Twin-Merging) with the best report mean accuracy, if any:
        the one registered as a routed model."""
        routed = [c for c in self.baselines if isinstance(c, Routed) and c.label in comparison]
        return max(routed, key=lambda c: comparison[c.label]["mean_accuracy"], default=None)

    def report_candidates(self, chosen: list[Candidate]) -> dict[str, Candidate]:
        """What the report split scores, by label: ``chosen`` (each family's best point),
        the baselines, then the references."""
        report = {c.label: c for c in chosen}
        report.update({c.label: c for c in self.baselines})
        report.update({c.label: c for c in self.references})
        return report


def make_plan(spec: MergeSpec) -> Plan:
    """The spec's families, baselines and references as candidates."""
    largest = max(spec.grid.rank_ratios)
    notes: list[str] = []

    def of(method: MethodSpec) -> Candidate:
        candidate, note = candidate_of(method, largest)
        if note and note not in notes:
            notes.append(note)
        return candidate

    families = [Family(CART_FAMILY, tuple(cart_point(r, s) for r, s in spec.grid.points()))]
    for family in spec.grid.families:
        name = family.label or family.method
        if name in [f.name for f in families]:
            name = f"{name} {len(families)}"
        families.append(Family(name, tuple(of(point) for point in family.points())))
    baselines = tuple(of(b) for b in spec.baseline_methods())
    references = tuple(reference(n) for n in ("finetuned", "zeroshot") if spec.has_reference(n))
    return Plan(tuple(families), baselines, references, tuple(notes))
