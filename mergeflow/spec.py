"""The merge spec: everything one pipeline run needs, as a frozen pydantic model.

It is the flow's parameter (so the Prefect UI renders it as a form) and loads from YAML.
Validation happens before any download, and every error names the field at fault, e.g.
``tasks.2.templates: each template needs a '{c}' for the class name``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergeflow.errors import ParameterError
from mergeflow.kernels import DEFAULT_RANK_RATIO

REFERENCES = ("finetuned", "zeroshot")
DEFAULT_BASELINES = ("average", "task_arithmetic", "finetuned", "zeroshot")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatasetSpec(_Frozen):
    """Where a task's images and labels live and which splits to use."""

    uri: str = Field(
        description="parquet file or folder (with one SPLIT.parquet per split), an "
        "imagefolder directory, an s3:// URI to either, or a Hugging Face hub id"
    )
    format: Literal["auto", "parquet", "imagefolder", "hub"] = Field(
        "auto", description="how to read uri; auto guesses from it"
    )
    selection_split: str = Field("validation", description="split that picks the grid point")
    report_split: str = Field("test", description="split of the final comparison")
    adaptation_split: str | None = Field(
        None,
        description="split whose images (never labels) data-aware methods adapt on; "
        "default: the selection split",
    )
    image_column: str = "image"
    label_column: str = "label"
    max_samples: int | None = Field(
        None, gt=0, description="evaluate on at most this many samples per split"
    )


class TaskSpec(_Frozen):
    name: str = Field(description="short identifier of the task, e.g. mnist")
    checkpoint: str = Field(description="URI of the checkpoint fine-tuned on this task")
    dataset: DatasetSpec
    classes: tuple[str, ...] | None = Field(
        None, description="class names in label order; default: the dataset's label names"
    )
    templates: tuple[str, ...] = Field(
        ("a photo of a {c}.",), min_length=1, description="prompt templates, '{c}' = class"
    )

    @field_validator("name")
    @classmethod
    def check_name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("use letters, digits, '_', '.', '-' (starting with a letter or digit)")
        return name

    @field_validator("templates")
    @classmethod
    def check_templates(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        for template in templates:
            if "{c}" not in template:
                raise ValueError(f"each template needs a '{{c}}' for the class name: {template!r}")
        return templates

    @field_validator("classes")
    @classmethod
    def check_classes(cls, classes):
        if classes is not None:
            if len(classes) < 2:
                raise ValueError("a classification task needs at least two classes")
            if len(set(classes)) != len(classes):
                raise ValueError("class names must be distinct")
        return classes


def _location_part(part) -> str:
    text = str(part)
    return text if re.fullmatch(r"[\w\-\[\]]+", text) else repr(text)


def _under_roots(uri: str, roots: tuple[str, ...]) -> bool:
    """Whether ``uri`` lies under one of ``roots``: a ``..`` segment never does, and local
    paths are compared after resolving them (so links and ``..`` cannot leave a root)."""
    if ".." in uri.replace("\\", "/").split("/"):
        return False
    if "://" not in uri:
        resolved = os.path.realpath(uri)
        return any(
            "://" not in root and resolved.startswith(os.path.realpath(root).rstrip("/") + "/")
            for root in roots
        )
    return any(uri.startswith(root) for root in roots if "://" in root)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(_location_part(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _format_value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class MethodSpec(_Frozen):
    """A merge method with fixed parameters (see ``mergeflow methods``)."""

    method: str = Field(description="registered merge method, e.g. ties")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    label: str | None = Field(None, description="name in tables; default: method and params")

    @model_validator(mode="after")
    def check_method(self) -> MethodSpec:
        from mergeflow.methods import find_method

        try:
            method = find_method(self.method)
            if method.per_task and "task" in self.params:
                raise ValueError(
                    f"method {self.method!r} builds one model per task; the pipeline sets 'task'"
                )
            method.parse_params({**self.params, **({"task": 0} if method.per_task else {})})
        except ParameterError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        settings = " ".join(f"{k}={_format_value(v)}" for k, v in sorted(self.params.items()))
        return f"{self.method} {settings}".strip()


class FamilySpec(MethodSpec):
    """A method searched over a grid of parameter values beside CART's rank grid."""

    search: dict[str, tuple[Any, ...]] = Field(
        default_factory=dict,
        description="parameter → values to try; every combination is one grid point",
    )

    @field_validator("search")
    @classmethod
    def check_search(cls, search: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
        for name, values in search.items():
            if not values:
                raise ValueError(f"search.{name} lists no values")
        return search

    @model_validator(mode="after")
    def check_points(self) -> FamilySpec:
        from mergeflow.twin import ROUTED

        if self.method in ROUTED:
            raise ValueError(
                f"{self.method!r} builds a routed model, not one set of weights the grid can "
                "select and register: list it under baselines"
            )
        for point in self.points():
            point.check_method()
        return self

    def points(self) -> list[MethodSpec]:
        names = sorted(self.search)
        return [
            MethodSpec(
                method=self.method, params={**self.params, **dict(zip(names, values, strict=True))}
            )
            for values in itertools.product(*(self.search[n] for n in names))
        ]


class CompressionSpec(_Frozen):
    """CART as compression: θ_avg plus every task's rank-k centered factors in one file."""

    rank_ratio: float = Field(
        DEFAULT_RANK_RATIO, gt=0.0, le=1.0, description="rank kept per matrix"
    )
    energy: float | None = Field(
        None, gt=0.0, le=1.0, description="instead of rank_ratio: share of ‖τ̄_t‖² kept"
    )
    register_model: bool = Field(
        False, description="also register it, as REGISTERED_MODEL-indexed, taking the task name"
    )


class AlignSpec(_Frozen):
    """Weight matching before any merge (:mod:`mergeflow.align`), for checkpoints that did
    not start from one base: every task's open_clip image tower is permuted onto the
    reference task's (the same function, the reference's coordinates)."""

    reference: str | None = Field(
        None,
        description="the task whose checkpoint the others are aligned onto; default: the first",
    )
    heads: int | None = Field(
        None, gt=0, description="attention heads per block; default: from the model's config"
    )


class GridSpec(_Frozen):
    rank_ratios: tuple[float, ...] = Field(
        (0.04, 0.08, 0.12, 0.16), min_length=1, description="CART rank ratios, each in (0, 1]"
    )
    scales: tuple[float, ...] = Field(
        (1.0, 1.5), min_length=1, description="CART scales λ (weights of the low-rank sum)"
    )

    @field_validator("rank_ratios")
    @classmethod
    def check_ratios(cls, ratios: tuple[float, ...]) -> tuple[float, ...]:
        for r in ratios:
            if not 0 < r <= 1:
                raise ValueError(f"rank ratio {r} is outside (0, 1]")
        return tuple(sorted(set(ratios)))

    @field_validator("scales")
    @classmethod
    def check_scales(cls, scales: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(sorted(set(scales)))

    families: tuple[FamilySpec, ...] = Field(
        (), description="other methods searched beside CART, e.g. ties over density and scale"
    )

    def points(self) -> list[tuple[float, float]]:
        return [(r, s) for r in self.rank_ratios for s in self.scales]


class MergeSpec(_Frozen):
    """One merge pipeline run."""

    model: str = Field(
        description="the CLIP architecture: an open_clip config name (e.g. ViT-B-32), or a "
        "transformers CLIP as a folder with its config.json or a hub id (e.g. "
        "openai/clip-vit-base-patch32)"
    )
    base: str = Field(description="URI of the pre-trained checkpoint the tasks started from")
    tasks: tuple[TaskSpec, ...] = Field(min_length=2, description="the fine-tuned tasks")
    grid: GridSpec = GridSpec()
    baselines: tuple[str | MethodSpec, ...] = Field(
        DEFAULT_BASELINES,
        description="what to score beside the merged model on the report split: finetuned, "
        "zeroshot, a method name (default parameters) or {method, params, label}",
    )
    compression: CompressionSpec | None = Field(
        None, description="also build and score a CART index (compression)"
    )
    align: AlignSpec | None = Field(
        None,
        description="permute the checkpoints onto one task's by weight matching first (for "
        "checkpoints fine-tuned from different initializations)",
    )
    registered_model: str = Field(description="MLflow registered-model name")
    device: str = Field("auto", description="auto (CUDA when present), cpu or cuda")
    allowed_roots: tuple[str, ...] = Field(
        (),
        description="if set, every checkpoint and dataset URI must lie under one of these "
        "prefixes (e.g. s3://models/); anything else, local paths included, is refused",
    )
    batch_size: int = Field(256, gt=0, description="evaluation batch size")
    base_check: Literal["refuse", "warn", "off"] = Field(
        "refuse",
        description="what to do when a fine-tuned checkpoint lies farther from the base than "
        "max_base_distance (it was probably not fine-tuned from this base)",
    )
    max_base_distance: float = Field(
        0.5,
        gt=0.0,
        description="largest ‖θ_t − θ₀‖ / ‖θ₀‖ over floating tensors accepted as fine-tuned "
        "from the base (fine-tuning moves weights a few percent, the demo zoo's 6-8%; "
        "another init about 100%)",
    )

    @field_validator("baselines", mode="before")
    @classmethod
    def check_baselines(cls, baselines):
        if not isinstance(baselines, (list, tuple)):
            return baselines
        checked = []
        for i, baseline in enumerate(baselines):
            try:
                if isinstance(baseline, str):
                    if baseline not in REFERENCES:
                        MethodSpec(method=baseline)
                    checked.append(baseline)
                elif isinstance(baseline, MethodSpec):
                    checked.append(baseline)
                else:
                    checked.append(MethodSpec.model_validate(baseline))
            except ValidationError as exc:
                raise ValueError(f"entry {i}: {_first_error(exc)}") from None
        return checked

    @field_validator("device")
    @classmethod
    def check_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"use auto, cpu, cuda or cuda:N, not {device!r}")
        return device

    def baseline_methods(self) -> list[MethodSpec]:
        """The baselines that are merges, as method specs (finetuned/zeroshot left out)."""
        return [
            b if isinstance(b, MethodSpec) else MethodSpec(method=b)
            for b in self.baselines
            if not (isinstance(b, str) and b in REFERENCES)
        ]

    def has_reference(self, name: Literal["finetuned", "zeroshot"]) -> bool:
        return name in self.baselines

    @field_validator("model")
    @classmethod
    def check_model(cls, model: str) -> str:
        from pathlib import Path

        from mergeflow.models import is_model_reference, resolve_model

        if not is_model_reference(model):
            raise ValueError(
                f"unknown model {model!r}: an open_clip config name (see open_clip.list_models), "
                "a folder with config.json or open_clip_config.json, or a hub id ORG/NAME"
            )
        if Path(model).is_dir():  # a local folder is read now; a hub id when the run starts
            try:
                resolve_model(model)
            except ParameterError as exc:
                raise ValueError(str(exc)) from None
        return model

    @model_validator(mode="after")
    def check_roots(self) -> MergeSpec:
        if not self.allowed_roots:
            return self
        places = [("base", self.base)]
        for i, t in enumerate(self.tasks):
            places += [(f"tasks.{i}.checkpoint", t.checkpoint)]
            places += [(f"tasks.{i}.dataset.uri", t.dataset.uri)]
        for where, uri in places:
            if not _under_roots(uri, self.allowed_roots):
                raise ValueError(
                    f"{where}: {uri!r} is outside the allowed roots "
                    f"({', '.join(self.allowed_roots)})"
                )
        return self

    @model_validator(mode="after")
    def check_tasks_distinct(self) -> MergeSpec:
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            repeated = ", ".join(repr(n) for n in dupes)
            raise ValueError(f"tasks: task names must be distinct: {repeated} more than once")
        if self.align is not None and self.align.reference not in (None, *names):
            raise ValueError(
                f"align.reference: {self.align.reference!r} is not one of the tasks "
                f"({', '.join(names)})"
            )
        checkpoints = [t.checkpoint for t in self.tasks]
        if len(set(checkpoints)) != len(checkpoints):
            twice = next(c for c in checkpoints if checkpoints.count(c) > 1)
            raise ValueError(f"tasks: two tasks name the same checkpoint {twice}")
        return self

    @classmethod
    def parse(cls, data: dict, source: str = "spec") -> MergeSpec:
        """Validate ``data``; the error names the first offending field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            message = " ".join(_first_error(exc).splitlines())  # one line, whatever the input
            raise ParameterError(
                f"{source}: {message if ': ' in message else 'spec: ' + message}"
            ) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MergeSpec:
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise ParameterError(f"{path}: cannot read spec ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ParameterError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ParameterError(f"{path}: a spec is a mapping of fields")
        return cls.parse(data, str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def digest(self) -> str:
        """sha256 of the spec's canonical JSON: two runs of one spec share it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


class SpecOverrides(_Frozen):
    """What a run from a stored spec may change in it, from the Prefect UI's form."""

    grid: GridSpec | None = Field(None, description="search this grid instead of the spec's")
    baselines: tuple[str | MethodSpec, ...] | None = Field(
        None, description="compare with these instead of the spec's baselines"
    )
    registered_model: str | None = Field(
        None, description="register under this name instead of the spec's"
    )


def load_spec(uri: str) -> MergeSpec:
    """The spec in the YAML file at ``uri``: a local path or any fsspec URI (``s3://``)."""
    return MergeSpec.parse(read_spec_data(uri), source=uri)


def read_spec_data(uri: str) -> dict:
    """The mapping in the YAML file at ``uri`` (a local path or any fsspec URI)."""
    from mergeflow.storage import filesystem

    fs, path = filesystem(uri)
    try:
        with fs.open(path, "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ParameterError(f"{uri}: no such spec file") from None
    except yaml.YAMLError as exc:
        raise ParameterError(f"{uri}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ParameterError(f"{uri}: a spec is a mapping of fields")
    return data


def resolve_spec(
    spec: MergeSpec | None = None,
    spec_uri: str | None = None,
    overrides: SpecOverrides | None = None,
) -> MergeSpec:
    """The spec a run was given (``spec``) or the one stored at ``spec_uri``, with
    ``overrides`` applied and the result validated again."""
    if (spec is None) == (spec_uri is None):
        raise ParameterError("give exactly one of spec and spec_uri")
    resolved = spec if spec is not None else load_spec(spec_uri)
    changes = overrides.model_dump(mode="json", exclude_none=True) if overrides else {}
    if not changes:
        return resolved
    source = f"{spec_uri or 'spec'} with overrides {sorted(changes)}"
    return MergeSpec.parse({**resolved.model_dump(mode="json"), **changes}, source=source)
