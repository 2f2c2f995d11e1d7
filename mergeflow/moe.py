"""MC-SMoE's merge stage: fewer experts in one mixture-of-experts model, guided by routing.

Li et al., "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing
Policy", ICLR 2024 (M-SMoE, its merging stage).

For a Mixtral-style checkpoint (transformers' ``MixtralForCausalLM``: per layer a router
``mlp.gate.weight`` (E, D) and experts ``mlp.experts.gate_up_proj`` (E, 2I, D) and
``down_proj`` (E, D, I); older folders' ``block_sparse_moe.experts.N.w1/w2/w3`` are read
through transformers' own conversion), on calibration token sequences:

1. routing statistics per layer: each expert's usage f_e (its share of the router's
   top-k selections over all tokens) and the similarity of two experts, (cos + 1) / 2 of
   their router-logit columns over all tokens;
2. the ``experts`` most used experts of each layer are dominant; every other expert joins
   the dominant one it is most similar to;
3. each member's hidden units are permuted onto its group's dominant expert by weight
   matching (linear assignment on ⟨w1⟩ + ⟨w3⟩ + ⟨w2ᵀ⟩, a permutation the expert's output
   does not change under), then the group is averaged weighted by usage,
   W = Σ_i f_i W_i / Σ_i f_i (equal weights when no member was used);
4. the router keeps one row per group: the members' rows averaged by the same weights.

The output is a smaller MoE of the same class (``num_local_experts`` = ``experts`` in every
layer, which is why the paper's adaptive per-layer group counts are not offered: the config
holds one count) that ``from_pretrained`` loads. In the paper every member keeps its router
row and reaches the merged expert; one row per group only approximates that routing, so the
report measures it: the share of calibration tokens whose top group under the new router is
the group of their old top expert. The compression stage (low-rank plus sparse experts)
and the distillation after merging are not implemented.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergeflow.errors import ParameterError


class MoeMergeSpec(BaseModel):
    """What ``mergeflow moe-merge`` does (as a YAML spec or as flags)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="folder of a Mixtral-style checkpoint (local or s3://)")
    calibration: str = Field(
        description=".jsonl of {'input_ids': [...]} per line, or .txt of one sample per line "
        "(tokenized with the model folder's tokenizer)"
    )
    out: str = Field(description="folder the smaller MoE is written to (local or s3://)")
    experts: int = Field(gt=0, description="experts per layer after merging")
    samples: int = Field(256, gt=0, description="calibration sequences read")
    max_tokens: int = Field(512, gt=1, description="tokens per sequence at most")
    align: bool = Field(True, description="permute each member onto its dominant expert")


@dataclass(frozen=True)
class LayerGroups:
    """One layer's grouping: ``groups[g]`` lists its experts, the dominant one first;
    ``usage`` (E,) and ``similarity`` (E, E) are what the grouping read."""

    groups: tuple[tuple[int, ...], ...]
    usage: torch.Tensor
    similarity: torch.Tensor

    def group_of(self) -> torch.Tensor:
        """The group of every expert (E,)."""
        owner = torch.empty(len(self.usage), dtype=torch.long)
        for g, members in enumerate(self.groups):
            owner[list(members)] = g
        return owner


def moe_layers(model) -> list:
    """The sparse MoE blocks of ``model``, in layer order; refused when there are none."""
    blocks = [
        layer.mlp
        for layer in getattr(getattr(model, "model", model), "layers", [])
        if hasattr(getattr(layer, "mlp", None), "experts")
        and hasattr(layer.mlp.experts, "gate_up_proj")
    ]
    if not blocks:
        raise ParameterError(
            f"{type(model).__name__}: no Mixtral-style MoE layers (mlp.gate, "
            "mlp.experts.gate_up_proj/down_proj)"
        )
    return blocks


@torch.no_grad()
def routing_statistics(model, sequences: Sequence[torch.Tensor]) -> list[tuple]:
    """Per MoE layer ``(usage (E,), similarity (E, E), top expert per token (N,))`` over the
    calibration ``sequences`` (each (L,) token ids)."""
    blocks = moe_layers(model)
    logits: list[list[torch.Tensor]] = [[] for _ in blocks]
    chosen: list[list[torch.Tensor]] = [[] for _ in blocks]

    def hook(index):
        def record(module, inputs, output):
            router_logits, _, indices = output
            logits[index].append(router_logits.float().reshape(-1, router_logits.shape[-1]))
            chosen[index].append(indices.reshape(len(logits[index][-1]), -1))

        return record

    handles = [b.gate.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        model.eval()
        for ids in sequences:
            model(input_ids=ids[None].to(model.device))
    finally:
        for handle in handles:
            handle.remove()
    stats = []
    for layer_logits, layer_chosen in zip(logits, chosen, strict=True):
        all_logits, all_chosen = torch.cat(layer_logits), torch.cat(layer_chosen)
        experts = all_logits.shape[1]
        counts = torch.bincount(all_chosen.flatten(), minlength=experts).float()
        usage = counts / counts.sum()
        columns = torch.nn.functional.normalize(all_logits.T, dim=1)
        similarity = (columns @ columns.T + 1) / 2
        stats.append((usage, similarity, all_logits.argmax(1)))
    return stats


def group_experts(usage: torch.Tensor, similarity: torch.Tensor, experts: int) -> LayerGroups:
    """The ``experts`` most used experts are dominant (ties: the lower index); each other
    expert joins its most similar dominant one."""
    order = sorted(range(len(usage)), key=lambda e: (-float(usage[e]), e))
    dominant = order[:experts]
    members = {d: [d] for d in dominant}
    for e in order[experts:]:
        nearest = max(dominant, key=lambda d: (float(similarity[e, d]), -d))
        members[nearest].append(e)
    groups = tuple(tuple(members[d]) for d in sorted(dominant))
    return LayerGroups(groups, usage, similarity)


def expert_permutation(
    reference: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """The order of ``other``'s hidden units that best matches ``reference``'s: each is
    ``(gate_up (2I, D), down (D, I))``; maximizes Σ_i ⟨w1_ref[i], w1[p_i]⟩ + ⟨w3_ref[i],
    w3[p_i]⟩ + ⟨w2_ref[:, i], w2[:, p_i]⟩ by linear assignment."""
    from scipy.optimize import linear_sum_assignment

    (ref_up, ref_down), (up, down) = reference, other
    inner = ref_down.shape[1]
    cost = (
        ref_up[:inner].float() @ up[:inner].float().T
        + ref_up[inner:].float() @ up[inner:].float().T
        + ref_down.float().T @ down.float()
    )
    _, columns = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
    return torch.as_tensor(columns, dtype=torch.long)


def permute_expert(gate_up: torch.Tensor, down: torch.Tensor, order: torch.Tensor):
    """One expert with its hidden units in ``order``: the same function of its input."""
    inner = down.shape[1]
    rows = torch.cat([order, order + inner])
    return gate_up[rows], down[:, order]


def merge_layer(
    gate: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    groups: LayerGroups,
    align: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's router (E, D) and experts (E, 2I, D), (E, D, I) merged group by group:
    (K, D), (K, 2I, D), (K, D, I)."""
    new_gate, new_up, new_down = [], [], []
    for members in groups.groups:
        weights = groups.usage[list(members)].double()
        total = weights.sum()
        weights = weights / total if total > 0 else torch.full_like(weights, 1 / len(members))
        dominant = members[0]
        up_sum = torch.zeros_like(gate_up[dominant], dtype=torch.float64)
        down_sum = torch.zeros_like(down[dominant], dtype=torch.float64)
        row = torch.zeros_like(gate[dominant], dtype=torch.float64)
        for e, w in zip(members, weights, strict=True):
            up_e, down_e = gate_up[e], down[e]
            if align and e != dominant:
                order = expert_permutation((gate_up[dominant], down[dominant]), (up_e, down_e))
                up_e, down_e = permute_expert(up_e, down_e, order)
            up_sum += w * up_e.double()
            down_sum += w * down_e.double()
            row += w * gate[e].double()
        new_up.append(up_sum.to(gate_up.dtype))
        new_down.append(down_sum.to(down.dtype))
        new_gate.append(row.to(gate.dtype))
    return torch.stack(new_gate), torch.stack(new_up), torch.stack(new_down)


def merge_experts(model, sequences: Sequence[torch.Tensor], experts: int, align: bool = True):
    """The smaller MoE (a new model of ``model``'s class with ``experts`` experts per
    layer) and a report: each layer's groups and usage, and the routing agreement."""
    config = model.config
    before = config.num_local_experts
    if not config.num_experts_per_tok <= experts < before:
        raise ParameterError(
            f"experts: {experts} must be at least the experts each token is routed to "
            f"(num_experts_per_tok {config.num_experts_per_tok}) and fewer than the model's "
            f"{before}"
        )
    stats = routing_statistics(model, sequences)
    blocks = moe_layers(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prefixes = {id(module): name for name, module in model.named_modules()}
    layers, merged_blocks = [], []
    for block, (usage, similarity, top) in zip(blocks, stats, strict=True):
        groups = group_experts(usage, similarity, experts)
        prefix = prefixes[id(block)]
        gate, up, down = merge_layer(
            block.gate.weight.detach(),
            block.experts.gate_up_proj.detach(),
            block.experts.down_proj.detach(),
            groups,
            align,
        )
        state[f"{prefix}.gate.weight"] = gate
        state[f"{prefix}.experts.gate_up_proj"] = up
        state[f"{prefix}.experts.down_proj"] = down
        merged_blocks.append((prefix, groups, top))
        layers.append(
            {
                "groups": [list(g) for g in groups.groups],
                "usage": [round(float(u), 4) for u in usage],
            }
        )
    new_config = type(config).from_dict({**config.to_dict(), "num_local_experts": experts})
    smaller = type(model)(new_config).to(model.dtype)  # a bf16 model stays bf16
    smaller.load_state_dict(state)
    smaller.eval()
    agreement = _routing_agreement(smaller, sequences, merged_blocks)
    for layer, share in zip(layers, agreement, strict=True):
        layer["routing_agreement"] = round(share, 4)
    report = {
        "experts_before": before,
        "experts_after": experts,
        "aligned": align,
        "tokens": int(sum(len(s) for s in sequences)),
        "parameters_before": sum(p.numel() for p in model.parameters()),
        "parameters_after": sum(p.numel() for p in smaller.parameters()),
        "layers": layers,
    }
    return smaller, report


@torch.no_grad()
def _routing_agreement(smaller, sequences, merged_blocks) -> list[float]:
    """Per layer, the share of calibration tokens whose top group under the merged router
    is the group of their top expert before merging (each model routing its own hidden
    states: earlier merged layers count too)."""
    stats = routing_statistics(smaller, sequences)
    shares = []
    for (_, groups, top_before), (_, _, top_after) in zip(merged_blocks, stats, strict=True):
        shares.append(float((groups.group_of()[top_before] == top_after).float().mean()))
    return shares


def read_calibration(path: str, folder: Path, samples: int, max_tokens: int) -> list[torch.Tensor]:
    """Token sequences (each (L,) long) from ``path``: .jsonl with ``input_ids`` per line,
    or .txt of one sample per line tokenized by ``folder``'s tokenizer."""
    from mergeflow.storage import CheckpointCache

    local = CheckpointCache().fetch(path).path
    sequences = []
    if local.suffix == ".jsonl":
        for number, line in enumerate(local.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                ids = json.loads(line)["input_ids"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ParameterError(
                    f"{path}: line {number} is not a JSON object with 'input_ids'"
                ) from None
            sequences.append(torch.tensor(ids[:max_tokens], dtype=torch.long))
            if len(sequences) == samples:
                break
    elif local.suffix == ".txt":
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise ParameterError(
                f"{path}: a .txt calibration file needs the model folder's tokenizer, and "
                f"{folder} has none ({type(exc).__name__}); give token ids as .jsonl instead"
            ) from None
        for line in local.read_text().splitlines():
            if line.strip():
                ids = tokenizer(line, truncation=True, max_length=max_tokens)["input_ids"]
                sequences.append(torch.tensor(ids, dtype=torch.long))
            if len(sequences) == samples:
                break
    else:
        raise ParameterError(f"{path}: calibration must be .jsonl (token ids) or .txt (text)")
    sequences = [s for s in sequences if len(s)]
    if not sequences:
        raise ParameterError(f"{path}: no calibration samples")
    return sequences


def local_folder(uri: str) -> Path:
    """A local folder holding the files of the folder ``uri`` (fetched when remote)."""
    from mergeflow.storage import CheckpointCache, is_remote, local_path

    if not is_remote(uri):
        folder = local_path(uri)
        if not folder.is_dir():
            raise ParameterError(f"{uri}: no such folder")
        return folder
    cache = CheckpointCache()
    names = cache.list_folder(uri)
    if not names:
        raise ParameterError(f"{uri}: no such folder (or an empty one)")
    target = Path(tempfile.mkdtemp(prefix="mergeflow-moe-"))
    for name in names:
        (target / name).symlink_to(cache.fetch(f"{uri.rstrip('/')}/{name}").path)
    return target


def moe_merge(spec: MoeMergeSpec, say=print) -> dict:
    """Run ``spec``: load the model, read the calibration, merge, write the smaller MoE
    (with its tokenizer files and a ``mergeflow_moe.json`` report) to ``spec.out``."""
    from transformers import AutoModelForCausalLM

    from mergeflow.outputs import write_folder_files

    folder = local_folder(spec.model)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ParameterError(f"{spec.model}: no config.json (not a transformers model folder)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    sequences = read_calibration(spec.calibration, folder, spec.samples, spec.max_tokens)
    say(f"moe-merge: routing statistics on {len(sequences)} calibration sequences")
    smaller, report = merge_experts(model, sequences, spec.experts, spec.align)
    with tempfile.TemporaryDirectory(prefix="mergeflow-moe-out-") as tmp:
        smaller.save_pretrained(tmp)
        copies = {p.name: p for p in Path(tmp).iterdir() if p.is_file()}
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                copies[name] = folder / name
        write_folder_files(
            spec.out, {}, {"mergeflow_moe.json": json.dumps(report, indent=2)}, copies=copies
        )
    agreement = [layer["routing_agreement"] for layer in report["layers"]]
    say(
        f"moe-merge: {report['experts_before']} → {report['experts_after']} experts per layer, "
        f"{report['parameters_before']:,} → {report['parameters_after']:,} parameters; "
        f"routing agreement per layer {', '.join(f'{a:.2f}' for a in agreement)}; "
        f"wrote {spec.out}"
    )
    return report
