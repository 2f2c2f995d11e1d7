"""The models a pipeline run scores, one frozen type per kind.

Each candidate owns three things: its ``label`` (its name in tables), its content
:meth:`~Candidate.key` (a digest of what its weights are computed from: two candidates with
one key have the same weights, so the result store may hand one's scores to the other) and
how its weights are made (:meth:`~Candidate.weights`). A candidate that is one model per task
(``per_task``: the fine-tuned references, TALL masks, ``cart_indexed``) takes the task's name
in both.

=================  ===============================================  ===============
type               weights                                          report kind
=================  ===============================================  ===============
``Reference``      the base (zeroshot) or each task's checkpoint    reference
``CartPoint``      θ_avg + λ Σ_t SVD_k(τ̄_t) from the run's factors   data-free
``FixedMethod``    a registered data-free method, streamed per key  data-free
``PerTask``        a per-task method, one model per task            per-task
``DataAware``      a method that adapts on unlabeled samples        data-aware
``Continual``      a continual merge's state after its arrivals     data-free
``Routed``         Twin-Merging: θ* + routed twin vectors per input  routed
=================  ===============================================  ===============

They are pydantic models so they cross Prefect task boundaries as parameters;
:data:`AnyCandidate` reads any of them back by its ``kind``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergeflow.errors import ParameterError
from mergeflow.run import Run, content_key
from mergeflow.statedict import StateDict


class Candidate(BaseModel):
    """A model the pipeline can score (see the module's table)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str
    report_kind: ClassVar[str] = "data-free"

    @property
    def per_task(self) -> bool:
        """Whether this is one model per task (its key and weights take the task)."""
        return False

    @property
    def method(self) -> str:
        raise NotImplementedError

    @property
    def settings(self) -> dict[str, Any]:
        """The method's parameters as given (what tables and the registry show)."""
        return {}

    def record(self) -> dict:
        """``{method, params, label}``: how results and the registry's params name it."""
        return {"method": self.method, "params": dict(self.settings), "label": self.label}

    def key(self, run: Run, task: str | None = None) -> str:
        raise NotImplementedError

    def weights(self, run: Run, task: str | None = None) -> StateDict:
        raise NotImplementedError

    def state(self, run: Run, task: str | None = None) -> StateDict:
        """A whole model: :meth:`weights` plus the base's tensors they lack (a vision-only
        fine-tune's text tower)."""
        self._check_task(run, task)
        return run.context.complete(self.weights(run, task))

    def judge(self, run: Run, split: str, task: str | None = None) -> dict:
        """Per-task, per-image correctness on ``split`` (of ``task`` only, for a candidate
        that is one model per task): its :meth:`state` through the run's model."""
        return run.context.judge(self.state(run, task), split, only=task)

    def _check_task(self, run: Run, task: str | None) -> None:
        if self.per_task and task not in run.task_names:
            raise ParameterError(f"{self.label} is one model per task: name one of the tasks")


class Reference(Candidate):
    """The pre-trained base (``zeroshot``) or each task's own fine-tuned model."""

    kind: Literal["reference"] = "reference"
    name: Literal["finetuned", "zeroshot"]
    report_kind: ClassVar[str] = "reference"

    @property
    def per_task(self) -> bool:
        return self.name == "finetuned"

    @property
    def method(self) -> str:
        return self.name

    def key(self, run: Run, task: str | None = None) -> str:
        if self.name == "zeroshot":
            return content_key("model/1", "zeroshot", run.base_digest)
        self._check_task(run, task)
        checkpoint = run.digests[run.checkpoint_of(task)]
        return content_key("model/2", "finetuned", checkpoint, run.base_digest)

    def weights(self, run: Run, task: str | None = None) -> StateDict:
        if self.name == "zeroshot":
            return run.load_base()
        return run.load_task_state(task)


def reference(name: Literal["finetuned", "zeroshot"]) -> Reference:
    return Reference(name=name, label=name)


class CartPoint(Candidate):
    """One point of CART's grid, rebuilt from the run's factors (one SVD per matrix and task
    serves every point whose rank ratio is at most the grid's largest)."""

    kind: Literal["cart"] = "cart"
    rank_ratio: float = Field(gt=0.0, le=1.0)
    scale: float

    @property
    def method(self) -> str:
        return "cart"

    @property
    def settings(self) -> dict[str, Any]:
        return {"rank_ratio": self.rank_ratio, "scale": self.scale}

    def key(self, run: Run, task: str | None = None) -> str:
        point = (self.rank_ratio, self.scale)
        return content_key("model/2", "cart-factors", run.factors_key(), point, run.base_digest)

    def weights(self, run: Run, task: str | None = None) -> StateDict:
        largest = max(run.spec.grid.rank_ratios)
        if self.rank_ratio > largest:
            raise ParameterError(
                f"{self.label}: rank ratio {self.rank_ratio} is beyond the factors' largest "
                f"({largest}); merge it as the method cart instead"
            )
        return run.factors().merge(self.rank_ratio, self.scale, device=run.spec.device)


def cart_point(rank_ratio: float, scale: float, label: str | None = None) -> CartPoint:
    return CartPoint(
        rank_ratio=rank_ratio,
        scale=scale,
        label=label or f"cart rank_ratio={rank_ratio} scale={scale}",
    )


class FixedMethod(Candidate):
    """A registered data-free method with fixed parameters, run over the checkpoints key by
    key (streaming)."""

    kind: Literal["method"] = "method"
    name: str = Field(description="the registered method")
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.name

    @property
    def settings(self) -> dict[str, Any]:
        return self.params

    def _parsed(self, run: Run, task: str | None):
        from mergeflow.methods import get_method

        method = get_method(self.name)
        params = dict(self.params)
        if self.per_task:
            params["task"] = run.task_names.index(task)
        return method, method.parse_params(params)

    def key(self, run: Run, task: str | None = None) -> str:
        self._check_task(run, task)
        _, parsed = self._parsed(run, task)
        # the base always counts: tensors only it holds are carried into every merge
        inputs = run.task_digests + [run.base_digest]
        return content_key("model/2", self.name, parsed.model_dump(mode="json"), inputs)

    def weights(self, run: Run, task: str | None = None) -> StateDict:
        from mergeflow.memory import release_large_frees
        from mergeflow.merge import merge_readers

        method, parsed = self._parsed(run, task)
        release_large_frees()
        with run.task_readers() as (base, readers):
            return merge_readers(method, readers, base, parsed, device=run.spec.device)


class PerTask(FixedMethod):
    """A data-free method that builds one model per task (TALL masks, ``cart_indexed``):
    compression rather than one merged model."""

    kind: Literal["per-task"] = "per-task"
    report_kind: ClassVar[str] = "per-task"

    @property
    def per_task(self) -> bool:
        return True


class DataAware(FixedMethod):
    """A method that adapts on unlabeled samples of each task's adaptation split
    (AdaMerging, CART + AdaMerging, Fisher, RegMean). It runs once per checkpoints, method,
    parameters and samples; its merged weights, with what it learned in the file's metadata,
    are kept in the result store."""

    kind: Literal["data-aware"] = "data-aware"
    report_kind: ClassVar[str] = "data-aware"

    def _method(self):
        from mergeflow.methods import find_method

        method = find_method(self.name)
        return method, method.parse_params(self.params)

    def adapted_key(self, run: Run) -> str:
        method, params = self._method()
        samples_from = [
            (t.dataset.uri, t.dataset.adaptation_split or t.dataset.selection_split)
            for t in run.spec.tasks
        ]
        return content_key(
            "data-aware/1",
            [run.base_digest] + run.task_digests,
            method.name,
            params.model_dump(mode="json"),
            samples_from,
        )

    def key(self, run: Run, task: str | None = None) -> str:
        return content_key("model/1", "data-aware", self.adapted_key(run))

    def adapted(self, run: Run) -> tuple[str, str]:
        """Run the method unless the store holds its result: (store URI, local path)."""
        name = f"{self.adapted_key(run)}.safetensors"
        path = run.store.file("adapted", name, lambda uri: self._adapt(run, uri))
        return run.store.uri("adapted", name), path

    def weights(self, run: Run, task: str | None = None) -> StateDict:
        from mergeflow.checkpoints import load_state_dict

        return load_state_dict(self.adapted(run)[1])

    def learned(self, run: Run) -> dict:
        """What the method learned (coefficients, entropies, ...), from its file."""
        from mergeflow.checkpoints import open_checkpoint

        with open_checkpoint(self.adapted(run)[1]) as reader:
            return json.loads(reader.metadata().get("mergeflow.info", "{}"))

    def _inputs(self, run: Run):
        """What the method reads (open_clip names); whether the checkpoints are in
        transformers' names (the result is written back in them); the open_clip keys the
        checkpoints hold (the rest of ``inputs.finetuned`` is the base's)."""
        from mergeflow.data_aware import DataAwareInputs, TaskSamples
        from mergeflow.evaluation import ADAPTATION
        from mergeflow.hf_clip import is_hf_clip, to_open_clip
        from mergeflow.models import create_model, resolve_model
        from mergeflow.svd import resolve_device

        context = run.context
        samples = []
        for t in context.tasks:
            images = t.splits[ADAPTATION].images
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
            samples.append(TaskSamples(t.name, images[order], t.head))
        # the methods run open_clip's model, so they see whole models under open_clip's names
        finetuned = [run.load_task_state(name) for name in run.task_names]
        native_hf = is_hf_clip(finetuned[0])
        inputs = DataAwareInputs(
            model=create_model(resolve_model(run.spec.model), context.base),
            base=to_open_clip(context.base),
            finetuned=[to_open_clip(context.complete(state)) for state in finetuned],
            samples=samples,
            device=resolve_device(run.spec.device),
        )
        return inputs, native_hf, frozenset(to_open_clip(finetuned[0]))

    def _adapt(self, run: Run, uri: str) -> None:
        from mergeflow.checkpoints import save_state_dict
        from mergeflow.hf_clip import from_open_clip

        method, params = self._method()
        inputs, native_hf, _ = self._inputs(run)
        outcome = method.run(inputs, params)
        state = from_open_clip(outcome.state) if native_hf else outcome.state
        metadata = {"mergeflow.method": method.name, "mergeflow.info": json.dumps(outcome.info)}
        save_state_dict(state, uri, metadata)


class Continual(Candidate):
    """The model a continual merge stands for after some arrivals: θ_0 + c · R, read from
    the state ``state_key`` (a content key, :func:`mergeflow.arrivals.state_key`) in the result
    store, where folding the arrivals in put it."""

    kind: Literal["continual"] = "continual"
    name: str = Field(description="the continual method")
    params: dict[str, Any] = Field(default_factory=dict)
    state_key: str = Field(description="the state's content key")

    @property
    def method(self) -> str:
        return f"continual {self.name}"

    @property
    def settings(self) -> dict[str, Any]:
        return self.params

    def key(self, run: Run, task: str | None = None) -> str:
        return content_key("model/2", "continual", self.state_key)

    def weights(self, run: Run, task: str | None = None) -> StateDict:
        from mergeflow.arrivals import open_state, read_state
        from mergeflow.checkpoints import open_checkpoint
        from mergeflow.continual import ContinualModel

        record = read_state(run.store, self.state_key)
        if record is None:
            raise ParameterError(
                f"{self.label}: no continual state {self.state_key} in {run.store.root}: fold "
                "the arrivals in first"
            )
        with open_checkpoint(run.spec.base, run.cache) as base, open_state(record, run.cache) as r:
            return dict(ContinualModel(record, base, r).tensors())


class Routed(DataAware):
    """Twin-Merging's routed model (:mod:`mergeflow.twin`): the shared merge, each task's
    compressed twin vector and the router trained on the adaptation split's images (their
    task, never their labels), in one file of the result store. It has no single set of
    weights: each image is scored through its own θ(x)."""

    kind: Literal["routed"] = "routed"
    report_kind: ClassVar[str] = "routed"

    def _method(self):
        from mergeflow.twin import ROUTED

        method = ROUTED[self.name]
        return method, method.parse_params(self.params)

    def key(self, run: Run, task: str | None = None) -> str:
        return content_key("model/1", "routed", self.adapted_key(run))

    def weights(self, run: Run, task: str | None = None) -> StateDict:
        raise ParameterError(
            f"{self.label} is a routed model: its weights depend on each input (register it "
            "as a routed model, or use its shared merge as a method)"
        )

    def judge(self, run: Run, split: str, task: str | None = None) -> dict:
        from mergeflow.hf_clip import to_open_clip
        from mergeflow.svd import resolve_device
        from mergeflow.twin import load_twin

        context, path = run.context, self.adapted(run)[1]
        with context.lock:
            twin = load_twin(path, context.model, to_open_clip(context.base))
            twin.to(resolve_device(run.spec.device))
            return {
                t.name: twin.correctness(
                    t.splits[split].images, t.splits[split].labels, t.head, run.spec.batch_size
                ).numpy()
                for t in context.tasks
                if task in (None, t.name)
            }

    def _adapt(self, run: Run, uri: str) -> None:
        from mergeflow.pipeline import checkpoint_bytes
        from mergeflow.twin import build_twin, save_twin

        _, params = self._method()
        inputs, _, held = self._inputs(run)
        samples = [(s.name, s.images) for s in inputs.samples]
        twin, shared, info = build_twin(
            inputs.model, inputs.base, inputs.finetuned, samples, params, inputs.device
        )
        # θ* is kept for the tensors the checkpoints hold (the rest is the base's)
        info["checkpoint_bytes"] = checkpoint_bytes(run)
        save_twin(twin, {k: v for k, v in shared.items() if k in held}, uri, info)


AnyCandidate = Annotated[
    Reference | CartPoint | FixedMethod | PerTask | DataAware | Continual | Routed,
    Field(discriminator="kind"),
]
