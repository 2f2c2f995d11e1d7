"""What a merge method is: a frozen parameter model and a pure per-tensor function."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from mergeflow.errors import ParameterError


class MethodParams(BaseModel):
    """Base for every method's parameters: frozen, and unknown names are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


MergeTensorFn = Callable[[str, Sequence[torch.Tensor], "torch.Tensor | None", Any], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as data.

    ``merge_tensor(key, finetuned, base, params)`` receives the T fine-tuned tensors for one
    key (float32, on the compute device, each of the checkpoint's shape) and the base tensor
    (or None when the method does not use it) and returns the merged float32 tensor.
    """

    name: str
    summary: str
    reference: str
    params: type[MethodParams]
    merge_tensor: MergeTensorFn
    uses_base: bool

    def parse_params(self, raw: Mapping[str, Any] | MethodParams | None = None) -> MethodParams:
        """Validate ``raw`` against this method's parameters; errors name the field."""
        if isinstance(raw, self.params):
            return raw
        try:
            return self.params.model_validate(dict(raw or {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "params"
            if err["type"] == "extra_forbidden":
                known = ", ".join(self.params.model_fields) or "none"
                raise ParameterError(
                    f"method {self.name!r} has no parameter {field!r} (it takes: {known})"
                ) from None
            raise ParameterError(
                f"method {self.name!r}, parameter {field!r}: {err['msg']}"
                f" (got {err.get('input')!r})"
            ) from None

    def describe_params(self) -> str:
        parts = []
        for name, field in self.params.model_fields.items():
            default = "required" if field.is_required() else f"default {field.default!r}"
            parts.append(f"{name} ({default})")
        return ", ".join(parts) or "no parameters"
