"""CART compression: one file holding θ_avg and every task's rank-k centered factors.

T fine-tuned checkpoints of P parameters take T·P numbers; the index takes P for θ_avg plus,
per task, k(m + n + 1) per selected (m, n) matrix and the few other tensors (biases, norms,
embeddings) whole. :meth:`CartIndex.rebuild` gives back task t's model,

    θ_t ≈ θ_avg + U_t,k S_t,k V_t,kᵀ   (exact at full rank),

the same weights as ``mergeflow merge --method cart_indexed --param task=t``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from mergeflow.checkpoints import (
    CheckpointReader,
    load_for_compute,
    open_checkpoints,
    read_formatted,
    save_state_dict,
)
from mergeflow.errors import ParameterError
from mergeflow.kernels.cart import DEFAULT_RANK_RATIO, centered, factorize_task_vector
from mergeflow.memory import release_large_frees
from mergeflow.merge import common_layout
from mergeflow.methods.cart_indexed import METHOD as CART_INDEXED
from mergeflow.methods.cart_indexed import CartIndexedParams
from mergeflow.statedict import COMPUTE_DTYPE, StateDict
from mergeflow.storage import CheckpointCache
from mergeflow.svd import (
    Factors,
    factors_bytes,
    factors_from_tensors,
    factors_to_tensors,
    low_rank_sum,
    resolve_device,
)

FORMAT = "mergeflow.cart_index/1"


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


class CartIndex:
    """θ_avg, per task the factors of τ̄_t on selected matrices and τ̄_t itself elsewhere
    (nothing for tensors that no task changed).

    Everything is kept in the checkpoints' dtype (what a deployment would store); rebuilding
    computes in float32 and returns the checkpoints' dtype.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        average: StateDict,
        factors: dict[str, list[Factors]],
        residuals: dict[str, list[torch.Tensor]],
        params: CartIndexedParams,
    ):
        self.tasks = list(tasks)
        self.average = average
        self.factors = factors
        self.residuals = residuals
        self.params = params

    @classmethod
    def build(
        cls,
        finetuned: Sequence[CheckpointReader],
        tasks: Sequence[str],
        rank_ratio: float = DEFAULT_RANK_RATIO,
        energy: float | None = None,
        selection: Mapping | None = None,
        device: str | torch.device | None = "auto",
        progress: bool = False,
    ) -> CartIndex:
        if len(tasks) != len(finetuned):
            raise ParameterError(f"{len(tasks)} task names for {len(finetuned)} checkpoints")
        params = CART_INDEXED.parse_params(
            {"task": 0, "rank_ratio": rank_ratio, "energy": energy, **dict(selection or {})}
        )
        layout = common_layout(finetuned)
        compute_device = resolve_device(device)
        average: StateDict = {}
        factors: dict[str, list[Factors]] = {}
        residuals: dict[str, list[torch.Tensor]] = {}
        for key, (shape, dtype) in tqdm(
            layout.items(), desc="index", unit="tensor", disable=not progress
        ):
            if not dtype.is_floating_point:
                average[key] = finetuned[0].get(key).clone()
                continue
            tensors = [load_for_compute(r, key, compute_device, COMPUTE_DTYPE) for r in finetuned]
            if all(torch.equal(tensors[0], other) for other in tensors[1:]):
                # no task changed it (e.g. a frozen text tower): store it once, exactly
                average[key] = finetuned[0].get(key).clone()
                continue
            avg, task_vectors = centered(tensors)
            average[key] = avg.to(dtype).cpu()
            if params.selects(key, shape):
                factors[key] = [
                    _cast(factorize_task_vector(tau, params.rank_ratio, params.energy), dtype)
                    for tau in task_vectors
                ]
            else:
                residuals[key] = [tau.to(dtype).cpu() for tau in task_vectors]
        return cls(tasks, average, factors, residuals, params)

    def task_index(self, task: int | str) -> int:
        if isinstance(task, int) and 0 <= task < len(self.tasks):
            return task
        if task in self.tasks:
            return self.tasks.index(task)
        raise ParameterError(f"unknown task {task!r} (this index holds: {', '.join(self.tasks)})")

    def rebuild(self, task: int | str, device: str | torch.device | None = "auto") -> StateDict:
        """Task ``task``'s model (by name or index), in the checkpoints' dtypes, on the CPU."""
        t = self.task_index(task)
        compute_device = resolve_device(device)
        out: StateDict = {}
        for key, avg in self.average.items():
            if key in self.factors:
                f = self.factors[key][t]
                on_device = Factors(
                    *(x.to(compute_device, COMPUTE_DTYPE) for x in (f.u, f.s, f.vh))
                )
                update = low_rank_sum([on_device], on_device.rank)
            elif key in self.residuals:
                update = self.residuals[key][t].to(compute_device, COMPUTE_DTYPE)
            else:
                out[key] = avg.clone()
                continue
            out[key] = (avg.to(compute_device, COMPUTE_DTYPE) + update).to(avg.dtype).cpu()
        return out

    def num_bytes(self) -> int:
        dense = list(self.average.values()) + [
            r for task_residuals in self.residuals.values() for r in task_residuals
        ]
        return sum(t.numel() * t.element_size() for t in dense) + factors_bytes(self.factors)

    def save(self, uri: str | os.PathLike) -> None:
        tensors: StateDict = {f"average/{k}": v for k, v in self.average.items()}
        tensors.update(factors_to_tensors(self.factors))
        for key, task_residuals in self.residuals.items():
            for t, r in enumerate(task_residuals):
                tensors[f"residual/{t}/{key}"] = r
        metadata = {
            "format": FORMAT,
            "tasks": json.dumps(self.tasks),
            "params": self.params.model_dump_json(),
        }
        save_state_dict(tensors, uri, metadata)

    @classmethod
    def load(cls, uri: str | os.PathLike, cache: CheckpointCache | None = None) -> CartIndex:
        meta, state = read_formatted(uri, FORMAT, "a CART index", cache)
        tasks = json.loads(meta["tasks"])
        params = CartIndexedParams.model_validate_json(meta["params"])
        average = {k.removeprefix("average/"): v for k, v in state.items() if k[:8] == "average/"}
        factors = factors_from_tensors(state, list(average), len(tasks))
        residuals = {
            key: [state[f"residual/{t}/{key}"] for t in range(len(tasks))]
            for key in average
            if f"residual/0/{key}" in state
        }
        return cls(tasks, average, factors, residuals, params)


def _cast(factors: Factors, dtype: torch.dtype) -> Factors:
    return Factors(*(x.to(dtype).cpu().contiguous() for x in (factors.u, factors.s, factors.vh)))


def compress_files(
    finetuned: Sequence[str | os.PathLike],
    tasks: Sequence[str],
    params: Mapping[str, object],
    out: str | os.PathLike,
    device: str | None = "auto",
    cache: CheckpointCache | None = None,
    progress: bool = False,
    base: str | os.PathLike | None = None,
) -> dict:
    """Build a CART index of ``finetuned`` (paths or URIs; PEFT adapters read over
    ``base``), write it to ``out``, and report its size against the checkpoints'."""
    release_large_frees()
    parsed = CART_INDEXED.parse_params({"task": 0, **dict(params)})
    with open_checkpoints(finetuned, base, cache or CheckpointCache()) as (_, readers):
        checkpoint_bytes = sum(
            math.prod(shape) * dtype.itemsize
            for r in readers
            for shape, dtype in r.layout().values()
        )
        index = CartIndex.build(
            readers,
            tasks,
            rank_ratio=parsed.rank_ratio,
            energy=parsed.energy,
            selection={"include": parsed.include, "exclude": parsed.exclude},
            device=device,
            progress=progress,
        )
    index.save(out)
    return {
        "index_bytes": index.num_bytes(),
        "checkpoint_bytes": checkpoint_bytes,
        "ratio": index.num_bytes() / checkpoint_bytes,
    }
