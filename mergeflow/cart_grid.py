"""A CART rank grid from one SVD per (matrix, task).

:meth:`CartFactors.factorize` reads the fine-tuned checkpoints key by key and keeps θ_avg
(float32) for every tensor plus, for each selected matrix and task, the top ``k_max``
singular triplets of the centered task vector τ̄_t, where ``k_max`` follows from
``max_rank_ratio``. :meth:`CartFactors.merge` then builds any (rank_ratio ≤ max_rank_ratio,
scale) point with one matrix product per matrix and no further SVD; the result equals
``mergeflow.methods.cart`` run directly with the same parameters (to float32 rounding).

A grid asks for several scales at each rank and for ranks in turn, so ``merge`` keeps the
last low-rank update of every matrix (float32, on the compute device: as much again as the
matrices of θ_avg) and reuses it: another scale costs one element-wise pass, and a higher
rank adds only the components between the two ranks. Ranks in ascending order then cost
one reconstruction at the largest rank in all.

Factors can be saved to and loaded from one safetensors file (local path or URI), so they
can be computed on a GPU worker and reused by others.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from mergeflow.checkpoints import (
    CheckpointReader,
    StateDictReader,
    load_for_compute,
    read_formatted,
    save_state_dict,
)
from mergeflow.errors import ParameterError
from mergeflow.kernels.cart import DEFAULT_RANK_RATIO, energy_ranks, factorize_centered
from mergeflow.merge import common_layout
from mergeflow.methods.cart import METHOD as CART
from mergeflow.methods.cart import CartParams, LowRankSelection
from mergeflow.statedict import COMPUTE_DTYPE, StateDict, mean_of
from mergeflow.storage import CheckpointCache
from mergeflow.svd import (
    Factors,
    factors_from_tensors,
    factors_to_tensors,
    low_rank_sum,
    rank_for,
    resolve_device,
)

log = logging.getLogger(__name__)

FORMAT = "mergeflow.cart_factors/2"


def _as_reader(
    source: CheckpointReader | Mapping[str, torch.Tensor], index: int
) -> CheckpointReader:
    if isinstance(source, CheckpointReader):
        return source
    return StateDictReader(source, name=f"fine-tuned model {index}")


class CartFactors:
    """θ_avg and the truncated SVD factors of every task's centered task vector.

    Attributes:
        average: key → θ_avg, float32 for floating tensors (integer buffers as stored).
        factors: selected key → one :class:`Factors` per task, each of rank ``k_max``.
        dtypes: key → the checkpoints' dtype, which merged tensors are cast back to.
    """

    def __init__(
        self,
        average: StateDict,
        factors: dict[str, list[Factors]],
        dtypes: dict[str, torch.dtype],
        num_tasks: int,
        max_rank_ratio: float,
        selection: LowRankSelection,
        norms: dict[str, torch.Tensor] | None = None,
    ):
        self.norms = norms or {}
        self._updates: dict[str, tuple[list[int], torch.Tensor]] = {}  # see the docstring
        self.average = average
        self.factors = factors
        self.dtypes = dtypes
        self.num_tasks = num_tasks
        self.max_rank_ratio = max_rank_ratio
        self.selection = selection

    @classmethod
    def factorize(
        cls,
        finetuned: Sequence[CheckpointReader | Mapping[str, torch.Tensor]],
        max_rank_ratio: float = 1.0,
        selection: LowRankSelection | None = None,
        device: str | torch.device | None = "auto",
        progress: bool = False,
    ) -> CartFactors:
        """One SVD per selected matrix and task, in float32 on ``device`` (CUDA when
        available under ``"auto"``); factors are kept on the CPU up to rank ``k_max``."""
        CART.parse_params({"rank_ratio": max_rank_ratio})  # the same bounds as a CART merge
        selection = selection or LowRankSelection()
        readers = [_as_reader(s, i) for i, s in enumerate(finetuned)]
        if not readers:
            raise ParameterError("no fine-tuned checkpoints given")
        layout = common_layout(readers)
        compute_device = resolve_device(device)
        average: StateDict = {}
        factors: dict[str, list[Factors]] = {}
        norms: dict[str, torch.Tensor] = {}
        dtypes: dict[str, torch.dtype] = {}
        keys = tqdm(layout.items(), desc="factorize", unit="tensor", disable=not progress)
        for key, (shape, dtype) in keys:
            dtypes[key] = dtype
            if not dtype.is_floating_point:
                average[key] = readers[0].get(key).clone()
                continue
            tensors = [load_for_compute(r, key, compute_device, COMPUTE_DTYPE) for r in readers]
            avg = mean_of(tensors)
            average[key] = avg.cpu()
            if selection.selects(key, shape):
                parts = factorize_centered(tensors, rank_for(shape, max_rank_ratio), avg)
                factors[key] = [f.to("cpu") for f in parts.factors]
                norms[key] = parts.norms2.cpu()
        log.info(
            "factorized %d matrices of %d tasks (max rank ratio %s)",
            len(factors),
            len(readers),
            max_rank_ratio,
        )
        return cls(average, factors, dtypes, len(readers), max_rank_ratio, selection, norms)

    def params(self, rank_ratio: float, scale: float = 1.0) -> CartParams:
        """CART parameters of one grid point (validated, with this grid's selection)."""
        parsed = CART.parse_params(
            {"rank_ratio": rank_ratio, "scale": scale, **self.selection.model_dump()}
        )
        if rank_ratio > self.max_rank_ratio:
            raise ParameterError(
                f"rank_ratio {rank_ratio} is above the factorized maximum {self.max_rank_ratio}; "
                "factorize with a larger max_rank_ratio"
            )
        return parsed

    def energy_ranks(self, key: str, energy: float) -> list[int]:
        """Per task, the rank that holds ``energy`` of τ̄_t's squared norm at ``key``."""
        ranks = energy_ranks(self.factors[key], self.norms[key], energy)
        for f, k in zip(self.factors[key], ranks, strict=True):
            if k > f.rank:
                raise ParameterError(
                    f"energy {energy} at {key!r} needs more than the {f.rank} factorized "
                    "singular triplets; factorize with a larger max_rank_ratio"
                )
        return ranks

    def merge(
        self,
        rank_ratio: float = DEFAULT_RANK_RATIO,
        scale: float = 1.0,
        device: str | torch.device | None = "auto",
        energy: float | None = None,
    ) -> StateDict:
        """The CART merge at (rank_ratio, scale), or with ranks chosen by ``energy``, in the
        checkpoints' dtypes, on the CPU."""
        if energy is None:
            self.params(rank_ratio, scale)
        else:
            CART.parse_params({"energy": energy, "scale": scale})
        compute_device = resolve_device(device)
        merged: StateDict = {}
        for key, avg in self.average.items():
            dtype = self.dtypes[key]
            if key in self.factors:
                if energy is None:
                    k = rank_for(avg.shape, rank_ratio)
                else:
                    k = self.energy_ranks(key, energy)
                ranks = [k] * self.num_tasks if isinstance(k, int) else list(k)
                update = self._update(key, ranks, compute_device)
                merged[key] = torch.add(avg.to(compute_device), update, alpha=scale)
                merged[key] = merged[key].to(dtype).cpu()
            elif dtype.is_floating_point:
                merged[key] = avg.to(dtype)
            else:
                merged[key] = avg.clone()
        return merged

    def _update(self, key: str, ranks: list[int], device: torch.device) -> torch.Tensor:
        """Σ_t SVD_{k_t}(τ̄_t) at ``key``, from the kept update of a previous call where its
        ranks are no higher than ``ranks`` (the components in between are added)."""
        kept_ranks, update = self._updates.get(key, (None, None))
        if update is not None and update.device == device and kept_ranks == ranks:
            return update
        on_device = [f.to(device) for f in self.factors[key]]
        if (
            update is not None
            and update.device == device
            and all(a <= k for a, k in zip(kept_ranks, ranks, strict=True))
        ):
            update.add_(low_rank_sum(on_device, ranks, start=kept_ranks))
        else:
            update = low_rank_sum(on_device, ranks)
        self._updates[key] = (ranks, update)
        return update

    def save(self, uri: str | os.PathLike) -> None:
        """Write everything to one safetensors file at ``uri``."""
        tensors: StateDict = {f"average/{k}": v for k, v in self.average.items()}
        tensors.update(factors_to_tensors(self.factors))
        tensors.update({f"norm2/{key}": norms for key, norms in self.norms.items()})
        metadata = {
            "format": FORMAT,
            "num_tasks": str(self.num_tasks),
            "max_rank_ratio": repr(self.max_rank_ratio),
            "selection": self.selection.model_dump_json(),
            "dtypes": json.dumps({k: str(d) for k, d in self.dtypes.items()}),
        }
        save_state_dict(tensors, uri, metadata)

    @classmethod
    def load(cls, uri: str | os.PathLike, cache: CheckpointCache | None = None) -> CartFactors:
        meta, state = read_formatted(uri, FORMAT, "a CART factors file", cache)
        num_tasks = int(meta["num_tasks"])
        dtypes = {
            k: getattr(torch, name.removeprefix("torch."))
            for k, name in json.loads(meta["dtypes"]).items()
        }
        average = {k: state[f"average/{k}"] for k in dtypes}
        factors = factors_from_tensors(state, list(dtypes), num_tasks)
        norms = {key: state[f"norm2/{key}"] for key in factors}
        selection = LowRankSelection.model_validate_json(meta["selection"])
        return cls(
            average,
            factors,
            dtypes,
            num_tasks,
            float(meta["max_rank_ratio"]),
            selection,
            norms,
        )
