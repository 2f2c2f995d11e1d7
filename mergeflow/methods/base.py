"""What a merge method is: a frozen parameter model and a pure per-tensor function."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from mergeflow.errors import ParameterError


class MethodParams(BaseModel):
    """Base for every method's parameters: frozen, and unknown names are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


MergeTensorFn = Callable[
    [str, Sequence[torch.Tensor], "torch.Tensor | None", Any, Any], torch.Tensor
]
Sweep = Callable[[], Iterator[tuple[str, list[torch.Tensor], "torch.Tensor | None"]]]
"""Starts one pass over the model: yields (key, fine-tuned tensors, base tensor or None) for
every floating key, float32 on the compute device, one key at a time."""


@dataclass(frozen=True)
class Described:
    """A method's name, one-line summary, paper, and parameter model."""

    name: str
    summary: str
    reference: str
    params: type[MethodParams]

    def parse_params(self, raw: Mapping[str, Any] | MethodParams | None = None) -> MethodParams:
        """Validate ``raw`` against this method's parameters; errors name the field."""
        if isinstance(raw, self.params):
            return raw
        try:
            return self.params.model_validate(dict(raw or {}))
        except ValidationError as exc:
            errors = exc.errors()  # an unknown name first: it is why the others look wrong
            err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
            field = ".".join(str(p) for p in err["loc"]) or "params"
            if err["type"] == "extra_forbidden":
                known = ", ".join(self.params.model_fields) or "none"
                raise ParameterError(
                    f"method {self.name!r} has no parameter {field!r} (it takes: {known})"
                ) from None
            raise ParameterError(
                f"method {self.name!r}, parameter {field!r}: "
                f"{err['msg'].removeprefix('Value error, ')}"
                f" (got {err.get('input')!r})"
            ) from None

    def describe_params(self) -> str:
        parts = []
        for name, field in self.params.model_fields.items():
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = f"default {field.default_factory()!r}"
            else:
                default = f"default {field.default!r}"
            parts.append(f"{name} ({default})")
        return ", ".join(parts) or "no parameters"


@dataclass(frozen=True)
class MergeMethod(Described):
    """A merge method as data.

    ``merge_tensor(key, finetuned, base, params, context)`` receives the T fine-tuned tensors
    for one key (float32, on the compute device, each of the checkpoint's shape), the base
    tensor (or None when the method does not use it) and returns the merged float32 tensor.

    Methods whose per-tensor rule depends on statistics of the whole model (TIES trims by a
    model-wide magnitude quantile) give ``prepare(sweep, params)``, which streams over the
    model as often as it needs and returns the ``context`` handed to every ``merge_tensor``
    call; for the others ``context`` is None.
    """

    merge_tensor: MergeTensorFn
    uses_base: bool | Callable[[Any], bool]
    prepare: Callable[[Sweep, Any], Any] | None = None
    per_task: bool = False
    """True for methods that build one model per task (a ``task`` parameter), not one merge."""
    elementwise: bool | Callable[[Any], bool] = False
    """True when each output entry depends only on the same entry of the inputs (and the
    context): such a merge may run over a large tensor in row blocks."""
    plan: Callable[[Mapping[str, Any], Any], Any] | None = None
    """For methods whose rule depends on the checkpoint's structure, not its values (layer
    recipes: how many layers each stack has): ``plan(layout, params)`` gives the context,
    from key names and shapes alone, before any tensor is read."""
    merge_factors: Callable[[str, Sequence, Any, Any, Any], torch.Tensor] | None = None
    """For methods that merge low-rank inputs as factors (Core Space): ``merge_factors(key,
    [(B_t, A_t)], base, params, context)`` on every key each input holds as B_t A_t over
    the base (a LoRA adapter's targets); such a method takes LoRA adapters only."""

    def needs_base(self, params: MethodParams) -> bool:
        """Whether the merge with ``params`` reads the base checkpoint."""
        return self.uses_base(params) if callable(self.uses_base) else self.uses_base

    def merges_elementwise(self, params: MethodParams) -> bool:
        """Whether the merge with ``params`` may run over row blocks of a tensor."""
        return self.elementwise(params) if callable(self.elementwise) else self.elementwise


def check_task_index(method: str, task: int, num_tasks: int) -> None:
    """A per-task method's ``task`` must index one of the fine-tuned checkpoints."""
    if task >= num_tasks:
        raise ParameterError(
            f"method {method!r}: task {task} is out of range for {num_tasks} fine-tuned "
            "checkpoints (0-based)"
        )


def factors_only(method: str, how: str) -> MergeTensorFn:
    """The ``merge_tensor`` of a method that merges LoRA factors only (``merge_factors``):
    a key that changed but is not a LoRA target of every adapter is refused."""

    def refuse(key, finetuned, base, params, context=None):
        raise ParameterError(
            f"{method}: {key!r} differs from the base but is not a LoRA target of every "
            f"adapter; it cannot be merged {how}"
        )

    return refuse
