"""Core Space merging of LoRA adapters: any task-vector method, run in a small shared space.

Panariello, Marczak et al., "Accurate and Efficient Low-Rank Model Merging in Core Space",
NeurIPS 2025 (the algorithm as apanariello4/core-space-merging runs it). Per adapted
matrix, with each adapter's ΔW_t = B_t A_t (its scale folded into B_t):

    U_B = the left singular vectors of [B_1 … B_T]      (m × R', R' ≤ Σ r_t)
    V_A = the right singular vectors of [A_1; …; A_T]   (R'' × n)
    M_t = U_Bᵀ B_t A_t V_Aᵀ                             (R' × R'': task t's core)
    ΔW  = U_B · f(M_1 … M_T) · V_A,    θ = θ_0 + α · ΔW

The projection is lossless (U_B M_t V_A = B_t A_t), so task arithmetic in core space is
task arithmetic in full space; the other methods (``method``: ties, tsv_m, iso_c, iso_cts,
cart) see the cores instead of the m × n vectors: two thin SVDs of the stacks and T small
R' × R'' matrices instead of T m × n ones. CART's k counts core dimensions (k = max(1,
int(rank_ratio · min(R', R'')))), as the paper does; its own ``scale`` (c) weighs the
low-rank sum and ``scale`` here (α) the whole delta, average included: both exposed.

Ours, where the reference is silent or differs: directions of a stack with σ below the
rank tolerance are dropped from the bases (they carry none of any ΔW_t); TIES runs with
``trim: tensor`` (each core its own top entries, as the reference trims per layer); the
reference's ceil(ρ R) for CART's k is CART's int rule here. Tensors the adapters do not
touch are the base's. Output: a dense model, or (``--out-format lora --rank R'``) one
adapter holding ΔW exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from mergeflow.methods.base import MergeMethod, MethodParams, factors_only

CORE_METHODS = ("task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts", "cart")


class CoreSpaceParams(MethodParams):
    method: Literal["task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts", "cart"] = Field(
        "task_arithmetic", description="the task-vector method run on the cores"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="that method's parameters (e.g. its own scale)"
    )
    scale: float = Field(1.0, description="α, the weight of the whole merged delta")

    @field_validator("params", mode="before")
    @classmethod
    def read_mapping(cls, value):
        """From the command line: ``--param 'params={scale: 0.5, density: 0.3}'`` (YAML)."""
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError("give the core method's parameters as a mapping, {name: value}")
        return value

    @model_validator(mode="after")
    def check_inner(self) -> CoreSpaceParams:
        inner_params(self)
        return self


def inner_params(params: CoreSpaceParams) -> MethodParams:
    """The core method's parameters: every core is a matrix (``include: .*``); TIES trims
    within each core."""
    from mergeflow.errors import ParameterError
    from mergeflow.methods import get_method

    method = get_method(params.method)
    raw = dict(params.params)
    if "include" in method.params.model_fields:
        raw.setdefault("include", (".*",))
    if params.method == "ties":
        if raw.get("trim", "tensor") != "tensor":
            raise ParameterError("core_space runs ties within each core: use trim: tensor")
        raw["trim"] = "tensor"
    return method.parse_params(raw)


def shared_basis(stack: torch.Tensor, rows: bool) -> torch.Tensor:
    """An orthonormal basis of the column space (``rows`` False: m × R') or row space
    (True: R'' × n) of ``stack``, without the directions of σ below the rank tolerance."""
    u, s, vh = torch.linalg.svd(stack, full_matrices=False)
    tol = max(stack.shape) * torch.finfo(s.dtype).eps * float(s[0]) if s.numel() else 0.0
    keep = max(1, int((s > tol).sum()))
    return vh[:keep] if rows else u[:, :keep]


def cores_of(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """(U_B, [M_t], V_A) of one matrix's adapters (float32)."""
    u_b = shared_basis(torch.cat([b for b, _ in factors], dim=1), rows=False)
    v_a = shared_basis(torch.cat([a for _, a in factors], dim=0), rows=True)
    cores = [(u_b.T @ b) @ (a @ v_a.T) for b, a in factors]
    return u_b, cores, v_a


def merge_factors(key, factors, base, params: CoreSpaceParams, context=None) -> torch.Tensor:
    from mergeflow.methods import get_method

    u_b, cores, v_a = cores_of(factors)
    method = get_method(params.method)
    origin = torch.zeros_like(cores[0])
    merged = method.merge_tensor(key, cores, origin, inner_params(params), None)
    return base + params.scale * (u_b @ merged @ v_a)


METHOD = MergeMethod(
    name="core_space",
    summary="LoRA adapters merged in the shared core space of their stacked factors "
    "(lossless for task arithmetic)",
    reference="Panariello et al., Accurate and Efficient Low-Rank Model Merging in Core "
    "Space, NeurIPS 2025",
    params=CoreSpaceParams,
    merge_tensor=factors_only("core_space", "in core space"),
    uses_base=True,
    merge_factors=merge_factors,
)
