"""Core Space against the full-space merge of the same LoRA adapters.

A Llama-shaped base (hidden 1024, intermediate 2816, 8 layers, vocabulary 32,000; fp32)
and ``--tasks`` PEFT LoRA adapters (rank ``--rank`` on q, k, v, o, gate, up and down, random
factors), made once with transformers and peft under ``--workdir`` (default
``.bench/core-space``). For task arithmetic, TSV-M, Iso-C and CART it times the merge of
the adapters in full space (every method on the dense ΔW_t = B_t A_t of each matrix) and in
core space (``core_space`` with that method), medians of ``--repeats`` runs in this process,
and prints both, their ratio, and how far the two merges are apart (the largest entry-wise
difference over the merged matrices relative to the largest entry of the full-space delta;
task arithmetic must agree, the others are other algorithms on the cores).

Usage: ``python bench/core_space.py [--tasks 8] [--rank 16] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.grid import machine_line  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [
    ("task arithmetic", "task_arithmetic", {"scale": 0.3}),
    ("TSV-M", "tsv_m", {"scale": 1.0}),
    ("Iso-C", "iso_c", {"scale": 1.0}),
    ("CART rank 0.25", "cart", {"rank_ratio": 0.25}),
]


def make_inputs(workdir: Path, tasks: int, rank: int) -> tuple[Path, list[Path]]:
    """The base folder and the adapters' folders (kept if present)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    base = workdir / "base"
    adapters = [workdir / f"adapter-r{rank}-{t}" for t in range(tasks)]
    if base.exists() and all(a.exists() for a in adapters):
        return base, adapters
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(base)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                         target_modules=TARGETS))  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    for folder in adapters:
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if "lora_" in name:
                    param.copy_(0.02 * torch.randn(param.shape, generator=gen))
        adapted.save_pretrained(folder)
    return base, adapters


def timed_merge(name, params, base, adapters, repeats):
    from mergeflow.checkpoints import open_checkpoints
    from mergeflow.merge import merge_readers

    seconds, merged = [], None
    for _ in range(repeats):
        with open_checkpoints(list(map(str, adapters)), str(base)) as (base_reader, readers):
            started = time.perf_counter()
            merged = merge_readers(name, readers, base_reader, params, device="cpu")
            seconds.append(time.perf_counter() - started)
            targets = list(readers[0].adapter.targets)
            base_state = {k: base_reader.get(k) for k in targets}
    return statistics.median(seconds), {k: merged[k] - base_state[k] for k in targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "core-space")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(machine_line())
    base, adapters = make_inputs(args.workdir, args.tasks, args.rank)
    print(f"Llama 1024/2816 x8, {args.tasks} LoRA adapters of rank {args.rank} on "
          f"{', '.join(TARGETS)}; medians of {args.repeats}")  # fmt: skip
    print(f"{'method':18s} {'full s':>8s} {'core s':>8s} {'core/full':>9s} {'max |diff|/max':>15s}")
    for label, name, params in CASES:
        full_s, full = timed_merge(name, params, base, adapters, args.repeats)
        core_params = {"method": name, "params": params}
        core_s, core = timed_merge("core_space", core_params, base, adapters, args.repeats)
        scale = max(float(d.abs().max()) for d in full.values())
        diff = max(float((core[k] - full[k]).abs().max()) for k in full) / scale
        print(f"{label:18s} {full_s:8.2f} {core_s:8.2f} {core_s / full_s:8.3f}x {diff:15.1e}")


if __name__ == "__main__":
    main()
