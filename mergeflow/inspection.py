"""What a checkpoint is, before merging it: ``mergeflow inspect URI``.

Format, detected architecture, dtypes, parameter count, shards, a LoRA adapter's rank and
targets, and which tensors each method family would treat as low-rank matrices, merge
element-wise, or copy.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from mergeflow.architectures import describe
from mergeflow.checkpoints import CheckpointReader, open_checkpoint
from mergeflow.methods.cart import AllMatrices, LowRankSelection
from mergeflow.sources import resolve_checkpoint
from mergeflow.storage import CheckpointCache

# method families whose matrix selection differs, with the methods that share it
SELECTIONS = (
    ("cart, cart_indexed, cart_adamerging", LowRankSelection()),
    ("tsv_m, iso_c, iso_cts", AllMatrices()),
)


@dataclass
class Inspection:
    uri: str
    format: str
    architecture: str
    tensors: int
    parameters: int
    dtypes: dict[str, int]
    shards: list[str] = field(default_factory=list)
    companions: list[str] = field(default_factory=list)
    lora: dict | None = None
    treatment: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        lines = [
            f"checkpoint    {self.uri}",
            f"format        {self.format}",
            f"architecture  {self.architecture}",
            f"tensors       {self.tensors:,}, {self.parameters:,} parameters "
            f"({self.parameters / 1e6:.1f}M)",
            "dtypes        " + ", ".join(f"{d} ({n} tensors)" for d, n in self.dtypes.items()),
        ]
        if self.shards:
            lines.append(f"shards        {len(self.shards)}: {', '.join(self.shards)}")
        if self.companions:
            lines.append(f"companions    {', '.join(self.companions)}")
        if self.lora:
            lines.append(
                f"LoRA          rank {self.lora['ranks']}, lora_alpha {self.lora['lora_alpha']}"
                f"{', rsLoRA' if self.lora['rslora'] else ''}, {len(self.lora['targets'])} "
                f"target modules ({', '.join(self.lora['target_modules'])}); base "
                f"{self.lora['base_model'] or 'not named'}"
            )
        for methods, t in self.treatment.items():
            lines.append(
                f"{methods}: {t['low_rank']} low-rank, {t['element_wise']} element-wise, "
                f"{t['copied']} copied (integer)"
            )
            if t["examples"]:
                lines.append(f"    low-rank e.g. {', '.join(t['examples'])}")
        return "\n".join(lines)


def _lora_summary(adapter) -> dict:
    ranks = sorted({adapter.rank(k) for k in adapter.targets})
    return {
        "ranks": "/".join(map(str, ranks)),
        "lora_alpha": adapter.config.get("lora_alpha"),
        "rslora": bool(adapter.config.get("use_rslora")),
        "targets": sorted(adapter.targets),
        "target_modules": sorted(
            {k.removesuffix(".weight").rsplit(".", 1)[-1] for k in adapter.targets}
        ),
        "base_model": adapter.base_model,
    }


def _inspect_adapter(source, cache: CheckpointCache) -> Inspection:
    """An adapter on its own: its factors and targets (the model needs its base)."""
    from mergeflow.checkpoints import open_file
    from mergeflow.lora import parse_adapter, read_adapter_config

    config = read_adapter_config(cache.fetch(source.adapter_config).path, source.uri)
    with open_file(source.weights_copy(cache)) as factors:
        adapter = parse_adapter(config, factors, source.uri)
        layout = factors.layout()
        dtypes = Counter(str(dtype).removeprefix("torch.") for _, dtype in layout.values())
        return Inspection(
            uri=source.uri,
            format="PEFT LoRA adapter (give --base to see the model it makes)",
            architecture=describe(adapter.targets),
            tensors=len(layout),
            parameters=sum(math.prod(shape) for shape, _ in layout.values()),
            dtypes=dict(dtypes.most_common()),
            companions=source.companions(),
            lora=_lora_summary(adapter),
        )


def inspect_reader(reader: CheckpointReader) -> Inspection:
    layout = reader.layout()
    dtypes = Counter(str(dtype).removeprefix("torch.") for _, dtype in layout.values())
    treatment = {}
    for methods, selection in SELECTIONS:
        chosen = [
            k
            for k, (shape, dtype) in layout.items()
            if dtype.is_floating_point and selection.selects(k, shape)
        ]
        floating = sum(1 for _, dtype in layout.values() if dtype.is_floating_point)
        treatment[methods] = {
            "rule": selection.describe_rule(),
            "low_rank": len(chosen),
            "element_wise": floating - len(chosen),
            "copied": len(layout) - floating,
            "examples": chosen[:3],
        }
    adapter = getattr(reader, "adapter", None)
    lora = _lora_summary(adapter) if adapter is not None else None
    source = reader.source
    return Inspection(
        uri=source.uri if source is not None else reader.name,
        format=reader.format,
        architecture=describe(layout),
        tensors=len(layout),
        parameters=sum(math.prod(shape) for shape, _ in layout.values()),
        dtypes=dict(dtypes.most_common()),
        shards=list(getattr(reader, "shard_files", [])),
        companions=source.companions() if source is not None else [],
        lora=lora,
        treatment=treatment,
    )


def inspect_checkpoint(
    uri: str, base: str | None = None, cache: CheckpointCache | None = None
) -> Inspection:
    """Inspect the checkpoint at ``uri`` (a LoRA adapter over ``base``, which it needs to
    be read as a model)."""
    cache = cache or CheckpointCache()
    source = resolve_checkpoint(uri, cache)
    if source.kind == "lora" and base is None:
        return _inspect_adapter(source, cache)
    base_reader = open_checkpoint(base, cache) if base is not None else None
    try:
        with open_checkpoint(uri, cache, base=base_reader) as reader:
            return inspect_reader(reader)
    finally:
        if base_reader is not None:
            base_reader.close()
