"""mergeflow side by side with the tools a user would pick instead: mergekit and FusionBench.

Every figure is a whole process measured by ``/usr/bin/time`` (wall, user + system CPU, peak
RSS), the two tools run in turn on the same files (the order alternates between repeats) and
the medians of ``--repeats`` runs are printed with the ratios mergeflow / peer:

  (a) task arithmetic (scale 0.3) and TIES (density 0.2, trim per tensor, mergekit's
      algorithm) on a Llama-shaped bf16 model, base + 4 fine-tuned, vs mergekit 0.1.5 in a
      venv of its own (``.bench/mergekit-venv``, made on first use, so its pins never touch
      the project's); ``--size 156m`` (hidden 1024, 8 layers, 156M parameters) or ``1b``
      (TinyLlama's dimensions, 1.1B);
  (b) TSV-M and Iso-C on the ViT-B/32 image tower (fp32, T = 8) vs FusionBench's own
      functions (``compute_and_sum_svd_mem_reduction``, ``iso_c``) in the project's venv;
  (c) CART over the 20-point grid of ``bench/grid.py`` against one merge, and the official
      code's way (a fresh SVD per point, 3 points timed, scaled to 20).

Agreement: the largest entry-wise difference over the whole model relative to the peer's
largest entry, and the share of entries that are equal. Inputs are kept in ``--workdir``
(default ``.bench/peers``) and reused. Usage: ``python bench/peers.py [--size 156m|1b]
[--repeats 3] [--only ta,ties,tsv_m,iso_c,grid] [--workdir DIR] [--cold-digests]``.
mergeflow hashes its inputs for the output's model card and remembers each file's digest by
its stat fingerprint; by default the first run hashes and the median is of remembered runs,
``--cold-digests`` hashes in every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT_VENV = ROOT / ".bench" / "mergekit-venv"
MERGEKIT_PINS = ("torch==2.14.1", "mergekit==0.1.5")
TASKS_LLAMA = 4
# True: each mergeflow run hashes its inputs (a first merge of new checkpoints); False: their
# digests are remembered from the first run (any later merge of the same files)
COLD_DIGESTS = False
TASKS_VIT = 8

LLAMA_SIZES = {
    "156m": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
}

# case -> (label, mergeflow arguments, mergekit method, mergekit per-model parameters)
LLAMA_CASES = {
    "ta": (
        "task arithmetic",
        ["--method", "task_arithmetic", "--param", "scale=0.3"],
        "task_arithmetic",
        {"weight": 0.3},
    ),
    "ties": (
        "TIES d=0.2, trim per tensor",
        ["--method", "ties", "--param", "density=0.2", "--param", "trim=tensor"],
        "ties",
        {"weight": 1.0, "density": 0.2},
    ),
}
VIT_CASES = {"tsv_m": "TSV-M", "iso_c": "Iso-C"}

TARGETS = {
    "ta": "wall <= 1.0x, RSS <= 1.0x, sys <= 2x mergekit",
    "ties": "wall <= 1.0x, RSS <= 1.0x, sys <= 2x mergekit",
    "tsv_m": "wall <= 0.75x, RSS <= 0.3x FusionBench",
    "iso_c": "wall <= 0.75x, RSS <= 0.3x FusionBench",
}


@dataclass(frozen=True)
class Timing:
    wall: float
    user: float
    sys: float
    rss_mib: float

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    return env


def timed(command: list[str], log: Path, cache_dir: Path | None = None) -> Timing:
    """Run ``command`` under /usr/bin/time; its output goes to ``log``; ``cache_dir``:
    mergeflow's ``MERGEFLOW_CACHE_DIR`` (where it remembers its inputs' digests)."""
    env = environment()
    if cache_dir is not None:
        env["MERGEFLOW_CACHE_DIR"] = str(cache_dir)
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats, log.open("w") as out:
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%e %U %S %M", "-o", stats.name, *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
        if done.returncode:
            tail = log.read_text().strip().splitlines()[-5:]
            raise SystemExit(f"{command[:4]} failed (exit {done.returncode}):\n" + "\n".join(tail))
        wall, user, system, rss_kib = stats.read().split()[-4:]
    return Timing(float(wall), float(user), float(system), int(rss_kib) / 1024)


def median(runs: list[Timing]) -> Timing:
    return Timing(
        *(
            statistics.median(getattr(r, f) for r in runs)
            for f in ("wall", "user", "sys", "rss_mib")
        )
    )


def paired(ours: list[str], peer: list[str], outs: tuple[Path, Path], logs: Path, repeats: int):
    """Medians of ``repeats`` paired runs, the order alternating; each run's output removed
    before it starts (``outs``: mergeflow's, the peer's)."""
    runs: dict[str, list[Timing]] = {"ours": [], "peer": []}
    order = [("ours", ours, outs[0]), ("peer", peer, outs[1])]
    for repeat in range(repeats):
        for name, command, out in order if repeat % 2 == 0 else order[::-1]:
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink(missing_ok=True)
            cache = None
            if name == "ours":  # cold: a fresh cache, so every input is hashed again
                cache = logs / f"cache-{repeat}" if COLD_DIGESTS else logs.parent / "cache"
                if COLD_DIGESTS:
                    shutil.rmtree(cache, ignore_errors=True)
            runs[name].append(timed(command, logs / f"{name}-{repeat}.log", cache))
            if cache is not None and COLD_DIGESTS:
                shutil.rmtree(cache, ignore_errors=True)
    return median(runs["ours"]), median(runs["peer"])


def ensure_mergekit() -> Path:
    """``mergekit-yaml`` from its own venv, made on first use (pip, local wheels)."""
    tool = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if tool.exists():
        return tool
    print(f"making {MERGEKIT_VENV} ({', '.join(MERGEKIT_PINS)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
    pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *MERGEKIT_PINS], check=True)
    return tool


def llama_inputs(workdir: Path, size: str) -> tuple[Path, list[Path]]:
    """A Llama-shaped bf16 base and TASKS_LLAMA fine-tuned copies (base + 0.002 N(0, 1)),
    each a transformers model folder (config.json, model.safetensors); kept if present."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folders = [
        workdir / f"llama-{size}" / name
        for name in ["base"] + [f"task{t}" for t in range(TASKS_LLAMA)]
    ]
    if all((f / "model.safetensors").exists() for f in folders):
        return folders[0], folders[1:]
    config = LlamaConfig(
        **LLAMA_SIZES[size],
        vocab_size=32000,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    base = {}
    gen = torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            base[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            base[key] = (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    for t, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        if t == 0:
            state = base
        else:
            gen = torch.Generator().manual_seed(t)
            state = {
                k: (v.float() + 0.002 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
                for k, v in base.items()
            }
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        del state
    return folders[0], folders[1:]


def agreement(ours: Path, peer: Path) -> str:
    """Largest |ours - peer| over the model relative to max |peer|, and the share equal."""
    from safetensors import safe_open

    def files(path: Path) -> list[Path]:
        return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]

    def tensors(path: Path) -> dict:
        found = {}
        for file in files(path):
            with safe_open(str(file), "pt") as f:
                found.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        return found

    a, b = tensors(ours), tensors(peer)
    if set(a) != set(b):
        return f"key sets differ: {len(set(a) ^ set(b))} keys in only one"
    worst = peak = 0.0
    equal = total = 0
    for key, theirs in b.items():
        mine, theirs = a[key].float(), theirs.float()
        worst = max(worst, (mine - theirs).abs().max().item())
        peak = max(peak, theirs.abs().max().item())
        equal += int((mine == theirs).sum())
        total += theirs.numel()
    return f"max |diff| / max |peer| = {worst / peak:.1e}, equal entries {100 * equal / total:.2f}%"


def ratio_line(label: str, ours: Timing, peer: Timing, agree: str, target: str) -> list[str]:
    return [
        f"{label:32s} {ours.wall:8.1f} {peer.wall:8.1f} {ours.wall / peer.wall:6.2f}x "
        f"{ours.cpu:8.1f} {peer.cpu:8.1f} {ours.cpu / peer.cpu:6.2f}x "
        f"{ours.sys:7.1f} {peer.sys:7.1f} {ours.sys / max(peer.sys, 0.01):6.2f}x "
        f"{ours.rss_mib:7.0f} {peer.rss_mib:7.0f} {ours.rss_mib / peer.rss_mib:6.2f}x",
        f"{'':32s} agreement: {agree}",
        f"{'':32s} target: {target}",
    ]


HEADER = (
    f"{'merge':32s} {'wall ours':>8s} {'peer':>8s} {'ratio':>7s} {'CPU ours':>8s} {'peer':>8s} "
    f"{'ratio':>7s} {'sys ours':>7s} {'peer':>7s} {'ratio':>7s} {'RSS MiB':>7s} {'peer':>7s} "
    f"{'ratio':>7s}"
)


def llama_commands(case: str, workdir: Path, size: str, shard_size: str = "500MB"):
    """mergeflow's and mergekit's command lines for ``case`` on the Llama inputs of
    ``size``, and their output folders (shards of ``shard_size`` bytes, bf16)."""
    from mergeflow.outputs import parse_size

    _, our_args, kit_method, kit_params = LLAMA_CASES[case]
    tool = ensure_mergekit()
    base, tuned = llama_inputs(workdir, size)
    ours_out = workdir / f"out-{case}-{size}-mergeflow"
    kit_out = workdir / f"out-{case}-{size}-mergekit"
    config = workdir / f"mergekit-{case}-{size}.yaml"
    models = "".join(f"  - model: {t}\n    parameters: {json.dumps(kit_params)}\n" for t in tuned)
    config.write_text(
        f"merge_method: {kit_method}\nbase_model: {base}\nmodels:\n{models}dtype: bfloat16\n"
    )
    kit_shard = f"{parse_size(shard_size) // 2}"  # mergekit counts parameters: 2 bytes each
    ours = [
        sys.executable, "-m", "mergeflow", "merge", *our_args, "--base", str(base),
        "--finetuned", *map(str, tuned), "--out", str(ours_out), "--shard-size", shard_size,
        "--device", "cpu", "-q",
    ]  # fmt: skip
    kit = [
        str(tool), str(config), str(kit_out), "--out-shard-size", kit_shard,
        "--no-copy-tokenizer", "--quiet",
    ]  # fmt: skip
    return ours, kit, ours_out, kit_out


def run_llama(case: str, workdir: Path, size: str, repeats: int) -> list[str]:
    ours, kit, ours_out, kit_out = llama_commands(case, workdir, size)
    label = f"{LLAMA_CASES[case][0]}, Llama {size}, T={TASKS_LLAMA}"
    target = TARGETS[case] + " (peer: mergekit, bf16 compute)"
    return compare(label, (ours, kit), (ours_out, kit_out), workdir / f"logs-{case}-{size}",
                   repeats, target)  # fmt: skip


def compare(label, commands, outs, logs: Path, repeats: int, target: str) -> list[str]:
    """The paired runs of (mergeflow, peer) ``commands`` and their lines of the table."""
    logs.mkdir(exist_ok=True)
    mine, theirs = paired(*commands, outs, logs, repeats)
    return ratio_line(label, mine, theirs, agreement(*outs), target)


def fusionbench_child(method: str, base: str, out: str, paths: list[str]) -> None:
    """FusionBench's own function on the task vectors, base + merged vector saved."""
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_grad_enabled(False)
    pretrained = load_file(base)
    vectors = []
    for path in paths:
        tuned = load_file(path)
        vectors.append({k: tuned[k] - pretrained[k] for k in pretrained})
        del tuned
    if method == "tsv_m":
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
            compute_and_sum_svd_mem_reduction,
        )

        merged = compute_and_sum_svd_mem_reduction(vectors, accelerator="cpu")
    else:
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c

        merged = iso_c(vectors, accelerator="cpu")
    save_file({k: (pretrained[k] + merged[k]).contiguous() for k in pretrained}, out)


def run_vit(case: str, workdir: Path, repeats: int) -> list[str]:
    from grid import prepare

    vit = workdir / "vit-b-32"
    vit.mkdir(parents=True, exist_ok=True)
    paths = prepare(vit, TASKS_VIT)
    base = vit / "base.safetensors"
    ours_out, peer_out = (
        workdir / f"out-{case}-mergeflow.safetensors",
        workdir / f"out-{case}-fb.safetensors",
    )
    ours = [
        sys.executable, "-m", "mergeflow", "merge", "--method", case, "--base", str(base),
        "--finetuned", *map(str, paths), "--out", str(ours_out), "--device", "cpu", "-q",
    ]  # fmt: skip
    peer = [
        sys.executable, __file__, "--fusionbench", case, str(base), str(peer_out),
        *map(str, paths),
    ]  # fmt: skip
    label = f"{VIT_CASES[case]}, ViT-B/32, T={TASKS_VIT}"
    target = TARGETS[case] + " (peer: FusionBench 0.2.33)"
    return compare(label, (ours, peer), (ours_out, peer_out), workdir / f"logs-{case}",
                   repeats, target)  # fmt: skip


def run_grid(workdir: Path, repeats: int) -> list[str]:
    """bench/grid.py's phases, each its own process: one merge and the 20-point grid paired,
    the naive way (a fresh SVD per point) once."""
    from grid import RANKS, SCALES, prepare

    vit = workdir / "vit-b-32"
    vit.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in prepare(vit, TASKS_VIT)]
    grid_script = str(Path(__file__).with_name("grid.py"))

    def phase(name: str) -> dict:
        done = subprocess.run(
            [sys.executable, grid_script, "--phase", name, *paths],
            capture_output=True, text=True, check=True, env=environment(),
        )  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])

    ones, grids = [], []
    for repeat in range(repeats):
        for name in ("one", "grid") if repeat % 2 == 0 else ("grid", "one"):
            (ones if name == "one" else grids).append(phase(name)["seconds"])
    naive = phase("naive")
    one, grid = statistics.median(ones), statistics.median(grids)
    points = len(RANKS) * len(SCALES)
    naive_grid = naive["seconds"] / naive["points"] * points
    return [
        f"CART, ViT-B/32, T={TASKS_VIT}: one merge (rank 0.12) {one:.1f} s, the {points}-point "
        f"grid {grid:.1f} s: grid / one = {grid / one:.2f} (target <= 1.15)",
        f"  the official code's way (a fresh SVD per point): {naive_grid:.0f} s for {points} "
        f"points, {naive_grid / grid:.1f}x the grid",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(LLAMA_SIZES), default="156m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="ta,ties,tsv_m,iso_c,grid")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench" / "peers")
    parser.add_argument(
        "--cold-digests",
        action="store_true",
        help="mergeflow hashes its inputs in every run (default: remembered after the first)",
    )
    parser.add_argument("--fusionbench", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fusionbench:
        base, out, *paths = args.paths
        fusionbench_child(args.fusionbench, base, out, paths)
        return

    from grid import machine_line

    global COLD_DIGESTS
    COLD_DIGESTS = args.cold_digests
    cases = args.only.split(",")
    unknown = set(cases) - {*LLAMA_CASES, *VIT_CASES, "grid"}
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    print(f"medians of {args.repeats} paired whole-process runs; inputs in {args.workdir}")
    hashing = "hashed in every run" if COLD_DIGESTS else "remembered after the first run"
    print(f"mergeflow's input digests (sha256, for the model card): {hashing}")
    started = time.perf_counter()
    lines = []
    for case in cases:
        print(f"running {case} ...", flush=True)
        if case in LLAMA_CASES:
            lines += run_llama(case, args.workdir, args.size, args.repeats)
        elif case in VIT_CASES:
            lines += run_vit(case, args.workdir, args.repeats)
        else:
            lines += run_grid(args.workdir, args.repeats)
    print()
    if any(c != "grid" for c in cases):
        print(HEADER)
    print("\n".join(lines))
    print(f"\n(wall and CPU in s, RSS = peak resident MiB; {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
