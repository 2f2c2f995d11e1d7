"""Twin-Merging: a shared expert, each task's exclusive knowledge compressed, and a router.

Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging",
NeurIPS 2024.

    θ*    = a static merge of the fine-tuned checkpoints (default: task arithmetic, λ 0.3)
    v_t   = SVD_k(θ_t − θ*)      k = max(1, int(density · min(m, n))); 1-D tensors whole
    w(x)  = softmax(router(f*(x)))      f*(x): the shared model's image features
    θ(x)  = θ* + Σ_t w_t(x) · v_t

Only the image tower (``visual.*``) takes twin vectors: classification with frozen heads
runs through nothing else. A matrix of more than two dimensions (the patch embedding) is
truncated as (out, everything else). The router is the paper's MLP (d → 2d → 2d → T with
batch norm, leaky ReLU and dropout) trained by cross-entropy on the task each unlabeled
image came from; its features are the shared model's normalized image embeddings (the
paper's token mean of the last hidden state, for a CLIP tower).

Inference is batched. ``routing: per_task`` (the default) groups a batch's rows by their
top-routed task and synthesizes one θ per group from the group's mean routing weights, so a
batch of one task costs one weight synthesis; rows of a group whose weights differ get
their mean (the router's weights of one task's images are close). ``routing: per_row`` is
the paper's exact θ(x): one synthesis per distinct weight vector.

Everything lives in one safetensors file (:func:`save_twin`, :func:`load_twin`): θ*'s
tensors, the twin factors, the router, and in its metadata the tasks and settings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from mergeflow.errors import ParameterError
from mergeflow.methods.base import Described, MethodParams
from mergeflow.statedict import StateDict

FORMAT = "mergeflow.twin/1"


class TwinParams(MethodParams):
    shared: str = Field("task_arithmetic", description="static merge giving the shared expert")
    shared_params: dict[str, Any] = Field(
        default_factory=lambda: {"scale": 0.3}, description="that merge's parameters"
    )
    density: float = Field(
        0.1, gt=0.0, le=1.0, description="share of each twin matrix's rank kept (the paper: 10%)"
    )
    samples: int = Field(64, gt=1, description="unlabeled images per task to train the router")
    held_out: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of those kept apart to measure the router"
    )
    epochs: int = Field(50, ge=0, description="router training epochs")
    lr: float = Field(5e-4, gt=0.0, description="router Adam learning rate")
    batch_size: int = Field(1024, gt=1, description="router training batch")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="router dropout")
    routing: Literal["per_task", "per_row"] = Field(
        "per_task",
        description="per_task: one weight synthesis per top-routed task in a batch (its "
        "rows' mean weights); per_row: the paper's θ(x), one per distinct weight vector",
    )
    seed: int = Field(0, description="seed of the router's initialization and batches")

    @field_validator("shared")
    @classmethod
    def check_shared(cls, name: str) -> str:
        from mergeflow.methods import get_method

        method = get_method(name)
        if method.per_task:
            raise ValueError(f"{name!r} builds one model per task: the shared expert is one")
        return name

    @field_validator("shared_params")
    @classmethod
    def check_shared_params(cls, value: dict[str, Any], info) -> dict[str, Any]:
        from mergeflow.methods import get_method

        if "shared" in info.data:  # else the method's own error is the one to show
            try:
                get_method(info.data["shared"]).parse_params(value)
            except ParameterError as exc:
                raise ValueError(str(exc)) from None
        return value


@dataclass(frozen=True)
class RoutedMethod(Described):
    """A method whose result is a routed model, not one set of weights (Twin-Merging)."""

    per_task: bool = False


TWIN_MERGING = RoutedMethod(
    name="twin_merging",
    summary="a shared merge plus each task's rank-truncated exclusive vector, mixed per "
    "input by a router trained on the shared model's features",
    reference="Lu et al., Twin-Merging, NeurIPS 2024",
    params=TwinParams,
)
ROUTED = {TWIN_MERGING.name: TWIN_MERGING}


class Router(torch.nn.Module):
    """The paper's router: features (N, d) → task logits (N, T)."""

    def __init__(self, dim: int, num_tasks: int, dropout: float = 0.5):
        super().__init__()
        hidden = 2 * dim
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden),
            torch.nn.BatchNorm1d(hidden),
            torch.nn.LeakyReLU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, hidden),
            torch.nn.BatchNorm1d(hidden),
            torch.nn.LeakyReLU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, num_tasks),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


@dataclass(frozen=True)
class TwinVector:
    """One task's twin vector of one tensor: ``whole`` (1-D or scalar tensors) or the rank-k
    factors ``a`` (m, k) · ``b`` (k, n) of the tensor reshaped to (m, n)."""

    shape: tuple[int, ...]
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    whole: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        if self.whole is not None:
            return self.whole
        return (self.a @ self.b).reshape(self.shape)

    def num_bytes(self) -> int:
        parts = [self.whole] if self.whole is not None else [self.a, self.b]
        return sum(p.numel() * p.element_size() for p in parts)


def compress(delta: torch.Tensor, density: float) -> TwinVector:
    """``delta`` truncated to its top ``max(1, int(density · min(m, n)))`` singular
    triplets (as float32 factors); 1-D and scalar tensors are kept whole."""
    delta = delta.to(torch.float32)
    if delta.ndim < 2:
        return TwinVector(tuple(delta.shape), whole=delta.clone())
    matrix = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = max(1, int(density * len(s)))
    return TwinVector(tuple(delta.shape), a=(u[:, :k] * s[:k]).contiguous(), b=vh[:k].contiguous())


@dataclass
class TwinModel:
    """A routed CLIP image model: ``model`` (open_clip, its ``visual`` run functionally),
    θ*'s image-tower tensors ``shared`` (names without ``visual.``), per task its twin
    vectors (same names), and the ``router``."""

    model: torch.nn.Module
    tasks: tuple[str, ...]
    shared: dict[str, torch.Tensor]
    twins: list[dict[str, TwinVector]]
    router: Router
    routing: str = "per_task"
    _stacked: dict = field(default_factory=dict, repr=False)

    def to(self, device) -> TwinModel:
        self.model.to(device)
        self.router.to(device)
        self.shared = {k: v.to(device) for k, v in self.shared.items()}
        self.twins = [
            {
                k: TwinVector(
                    v.shape,
                    *(None if p is None else p.to(device) for p in (v.a, v.b, v.whole)),
                )
                for k, v in twin.items()
            }
            for twin in self.twins
        ]
        self._stacked = {}
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.shared.values())).device

    def _stack(self, key: str):
        """Every task's factors of ``key`` side by side: A (m, Σk) and B (Σk, n) with the
        task of each column, or the whole vectors stacked (T, ...)."""
        if key not in self._stacked:
            vectors = [twin[key] for twin in self.twins]
            if vectors[0].whole is not None:
                self._stacked[key] = ("whole", torch.stack([v.whole for v in vectors]))
            else:
                a = torch.cat([v.a for v in vectors], 1)
                b = torch.cat([v.b for v in vectors], 0)
                owner = torch.cat(
                    [torch.full((v.a.shape[1],), t, device=a.device) for t, v in enumerate(vectors)]
                )
                self._stacked[key] = ("factors", (a, b, owner))
        return self._stacked[key]

    def synthesize(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ* + Σ_t weights_t · v_t for the image tower; ``weights`` (T,)."""
        params = dict(self.shared)
        for key in self.twins[0]:
            kind, stacked = self._stack(key)
            if kind == "whole":
                shaped = weights.reshape((-1,) + (1,) * (stacked.ndim - 1))
                params[key] = self.shared[key] + (shaped * stacked).sum(0)
            else:
                a, b, owner = stacked
                delta = (a * weights[owner]) @ b
                params[key] = self.shared[key] + delta.reshape(self.shared[key].shape)
        return params

    def features(self, images: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Normalized features (N, D) of ``images`` through the tower with ``params``."""
        return tower_features(self.model, params, images)

    @torch.no_grad()
    def route(self, images: torch.Tensor) -> torch.Tensor:
        """Routing weights (N, T): softmax of the router on θ*'s features."""
        self.router.eval()
        return torch.softmax(self.router(self.features(images, self.shared)), -1)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized features (N, D) of ``images`` through each row's θ(x), and the routing
        weights (N, T)."""
        weights = self.route(images)
        if self.routing == "per_row":
            unique, group = torch.unique(weights, dim=0, return_inverse=True)
            mixes = list(unique)
        else:
            group = weights.argmax(1)
            mixes = [weights[group == t].mean(0) if (group == t).any() else None for t in
                     range(len(self.tasks))]  # fmt: skip
        features = None
        for g, mix in enumerate(mixes):
            rows = (group == g).nonzero().flatten()
            if mix is None or len(rows) == 0:
                continue
            out = self.features(images[rows], self.synthesize(mix))
            if features is None:
                features = torch.empty(len(images), out.shape[1], device=out.device)
            features[rows] = out
        return features, weights

    @torch.no_grad()
    def logits(self, images: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Class logits (N, C) of ``images`` against ``head`` (C, D)."""
        features, _ = self.image_features(images)
        return self.model.logit_scale.exp().float() * features @ head.to(features).T

    def correctness(
        self, images: torch.Tensor, labels: torch.Tensor, head: torch.Tensor, batch_size: int
    ) -> torch.Tensor:
        """Whether the top-1 class against ``head`` is ``labels``' (bool, (N,)), routed and
        synthesized batch by batch."""
        right = [torch.zeros(0, dtype=torch.bool)]
        for start in range(0, len(labels), batch_size):
            batch = images[start : start + batch_size].to(self.device)
            predicted = self.logits(batch, head).argmax(1).cpu()
            right.append(predicted == labels[start : start + len(batch)])
        return torch.cat(right)


def tower_features(
    model: torch.nn.Module, params: Mapping[str, torch.Tensor], images: torch.Tensor
) -> torch.Tensor:
    """Normalized image features (N, D) of ``model.visual`` run with ``params`` (tower
    names, without ``visual.``)."""
    from torch.func import functional_call

    features = functional_call(model.visual, dict(params), (images,)).float()
    return features / features.norm(dim=-1, keepdim=True)


def _visual(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k.removeprefix("visual."): v
        for k, v in state.items()
        if k.startswith("visual.") and v.is_floating_point()
    }


def shared_expert(base: StateDict, finetuned: Sequence[StateDict], params: TwinParams) -> StateDict:
    """θ*: the static merge ``params.shared`` of ``finetuned`` over ``base``."""
    from mergeflow.checkpoints import StateDictReader
    from mergeflow.merge import merge_readers

    readers = [StateDictReader(s, f"task {t}") for t, s in enumerate(finetuned)]
    return merge_readers(
        params.shared, readers, StateDictReader(base, "base"), params.shared_params, device="cpu"
    )


def train_router(
    features: torch.Tensor, task_ids: torch.Tensor, num_tasks: int, params: TwinParams
) -> Router:
    """The router fitted to ``features`` (N, d) labelled by ``task_ids`` (N,)."""
    generator = torch.Generator().manual_seed(params.seed)
    torch.manual_seed(params.seed)  # the layers' initialization
    router = Router(features.shape[1], num_tasks, params.dropout).to(features.device)
    optimizer = torch.optim.Adam(router.parameters(), lr=params.lr)
    router.train()
    for _ in range(params.epochs):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for start in range(0, len(order), params.batch_size):
            batch = order[start : start + params.batch_size]
            if len(batch) < 2:  # batch norm needs two rows
                continue
            loss = torch.nn.functional.cross_entropy(router(features[batch]), task_ids[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return router.eval()


def build_twin(
    model: torch.nn.Module,
    base: StateDict,
    finetuned: Sequence[StateDict],
    samples: Sequence[tuple[str, torch.Tensor]],
    params: TwinParams,
    device: torch.device | str = "cpu",
) -> tuple[TwinModel, StateDict, dict]:
    """The routed model of ``finetuned`` (open_clip names; ``samples``: each task's name and
    unlabeled images (N, 3, H, W), in the checkpoints' order), θ*'s whole state, and what
    was measured (the router's accuracy on held-out images, the storage)."""
    shared_state = shared_expert(base, finetuned, params)
    shared = _visual(shared_state)
    twins = []
    for state in finetuned:
        tuned = _visual(state)
        twins.append(
            {k: compress(tuned[k].float() - shared[k].float(), params.density) for k in shared}
        )
    model = model.to(device).eval()
    shared_on_device = {k: v.float().to(device) for k, v in shared.items()}
    train_x, train_y, test_x, test_y = [], [], [], []
    with torch.no_grad():
        for t, (_, images) in enumerate(samples):
            images = images[: params.samples].to(device)
            features = tower_features(model, shared_on_device, images)
            keep = max(1, round(len(images) * (1 - params.held_out)))
            train_x.append(features[:keep])
            test_x.append(features[keep:])
            train_y.append(torch.full((keep,), t, device=device))
            test_y.append(torch.full((len(images) - keep,), t, device=device))
    router = train_router(torch.cat(train_x), torch.cat(train_y), len(samples), params)
    held_x, held_y = torch.cat(test_x), torch.cat(test_y)
    with torch.no_grad():
        train_acc = (router(torch.cat(train_x)).argmax(1) == torch.cat(train_y)).float()
        held_acc = (router(held_x).argmax(1) == held_y).float() if len(held_y) else None
    tasks = tuple(name for name, _ in samples)
    twin = TwinModel(model, tasks, shared_on_device, twins, router, params.routing).to(device)
    twin_bytes = sum(v.num_bytes() for t in twins for v in t.values())
    shared_bytes = sum(v.numel() * v.element_size() for v in shared.values())
    info = {
        "router_train_accuracy": float(train_acc.mean()),
        "router_held_out_accuracy": None if held_acc is None else float(held_acc.mean()),
        "router_samples": {name: min(len(x), params.samples) for name, x in samples},
        "routing": params.routing,
        "twin_bytes": twin_bytes,
        "shared_bytes": shared_bytes,
    }
    return twin, shared_state, info


def save_twin(twin: TwinModel, shared_state: StateDict, path: str, info: Mapping) -> None:
    """One safetensors file: ``shared.KEY`` (θ*'s whole state, its own names and dtypes),
    ``twin.T.KEY.a/.b`` or ``twin.T.KEY`` (each task's vectors), ``router.NAME``; the
    tasks, the router's size and ``info`` in its metadata."""
    from mergeflow.checkpoints import save_state_dict

    tensors = {f"shared.{k}": v for k, v in shared_state.items()}
    for t, vectors in enumerate(twin.twins):
        for key, v in vectors.items():
            if v.whole is not None:
                tensors[f"twin.{t}.{key}"] = v.whole.cpu()
            else:
                tensors[f"twin.{t}.{key}.a"] = v.a.cpu()
                tensors[f"twin.{t}.{key}.b"] = v.b.cpu()
    tensors.update({f"router.{k}": v.cpu() for k, v in twin.router.state_dict().items()})
    layout = {
        "format": FORMAT,
        "tasks": list(twin.tasks),
        "routing": twin.routing,
        "feature_dim": twin.router.net[0].in_features,
        "shapes": {k: list(v.shape) for k, v in twin.twins[0].items()},
    }
    stored = sum(v.numel() * v.element_size() for v in tensors.values())
    info = {**info, "stored_bytes": stored}
    metadata = {"mergeflow.twin": json.dumps(layout), "mergeflow.info": json.dumps(info)}
    save_state_dict({k: v.contiguous() for k, v in tensors.items()}, path, metadata)


@dataclass(frozen=True)
class TwinFile:
    """What a file written by :func:`save_twin` holds: its ``layout`` (tasks, routing,
    shapes), θ*'s state (``shared``, the checkpoints' keys), the ``twins`` and the router's
    state."""

    layout: dict
    shared: StateDict
    twins: list[dict[str, TwinVector]]
    router: StateDict


def _layout(reader, path: str) -> dict:
    meta = reader.metadata()
    if "mergeflow.twin" not in meta:
        raise ParameterError(f"{path}: not a Twin-Merging file (no mergeflow.twin metadata)")
    layout = json.loads(meta["mergeflow.twin"])
    if layout.get("format") != FORMAT:
        raise ParameterError(f"{path}: Twin-Merging format {layout.get('format')!r} unknown")
    return layout


def read_twin(path: str) -> TwinFile:
    """The file ``path`` written by :func:`save_twin`; anything else is refused, naming
    the file."""
    from mergeflow.checkpoints import open_checkpoint

    with open_checkpoint(path) as reader:
        layout = _layout(reader, path)
        tensors = reader.to_state_dict()
    shared = {k.removeprefix("shared."): v for k, v in tensors.items() if k.startswith("shared.")}
    router = {k.removeprefix("router."): v for k, v in tensors.items() if k.startswith("router.")}
    twins = []
    for t in range(len(layout["tasks"])):
        vectors = {}
        for key, shape in layout["shapes"].items():
            whole = tensors.get(f"twin.{t}.{key}")
            if whole is not None:
                vectors[key] = TwinVector(tuple(shape), whole=whole)
            else:
                a, b = tensors.get(f"twin.{t}.{key}.a"), tensors.get(f"twin.{t}.{key}.b")
                if a is None or b is None:
                    raise ParameterError(f"{path}: task {t} has no twin vector for {key}")
                vectors[key] = TwinVector(tuple(shape), a=a, b=b)
        twins.append(vectors)
    return TwinFile(layout, shared, twins, router)


def shared_keys(path: str) -> set[str]:
    """The keys of θ* a Twin-Merging file holds (the rest of a model is the base's), read
    from its header: no tensor is loaded."""
    from mergeflow.checkpoints import open_checkpoint

    with open_checkpoint(path) as reader:
        _layout(reader, path)
        held = reader.layout()
        return {k.removeprefix("shared.") for k in held if k.startswith("shared.")}


def load_twin(
    source: str | TwinFile, model: torch.nn.Module, complement: StateDict | None = None
) -> TwinModel:
    """The routed model in ``source`` (a path written by :func:`save_twin`, or its
    :func:`read_twin`) over ``model`` (open_clip, of the checkpoints' architecture), whose
    weights become θ* (plus ``complement``: tensors the checkpoints lack)."""
    from mergeflow.hf_clip import to_open_clip

    parts = read_twin(source) if isinstance(source, str) else source
    whole = to_open_clip({**(complement or {}), **parts.shared})
    model.load_state_dict(whole)
    router = Router(parts.layout["feature_dim"], len(parts.layout["tasks"]))
    router.load_state_dict(parts.router)
    shared = {k: v.float() for k, v in _visual(whole).items()}
    tasks, routing = tuple(parts.layout["tasks"]), parts.layout["routing"]
    return TwinModel(model.eval(), tasks, shared, parts.twins, router.eval(), routing)
