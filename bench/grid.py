"""How much a rank grid costs through the factor API, against one merge and the naive way.

On a ViT-B/32-shaped image tower (12 blocks, width 768, open_clip names) with T synthetic
fine-tuned copies written as safetensors, prints wall time and peak RSS for

  (a) one CART merge (mergeflow.merge.merge_readers, streaming from the files),
  (b) a 5 rank x 4 scale grid: CartFactors.factorize once, then 20 merges,
  (c) the naive way, a fresh CART merge (all its SVDs) per point, timed on 3 points,

and the ratios b/a and (c per point x 20)/b. Each phase runs in its own process so its peak
RSS is its own; with ``--device cuda`` the merges run there and the peak GPU memory is printed
too. Usage: ``python bench/grid.py [--tasks 8] [--workdir DIR] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANKS = (0.02, 0.04, 0.08, 0.12, 0.16)
SCALES = (0.5, 1.0, 1.5, 2.0)
NAIVE_POINTS = ((0.04, 1.0), (0.12, 1.5), (0.16, 0.5))


def _rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc: unlike ru_maxrss, the peak
    starts afresh in each phase's own process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def machine_line() -> str:
    import torch

    return (
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}, python {platform.python_version()}"
    )


def prepare(workdir: Path, tasks: int) -> list[Path]:
    """``tasks`` fine-tuned ViT-B/32 image towers (and their base, ``base.safetensors``)
    under ``workdir``; files already there are kept."""
    import torch
    from open_clip.transformer import VisionTransformer

    from mergeflow.checkpoints import save_state_dict

    paths = [workdir / f"task{t}.safetensors" for t in range(tasks)]
    base_path = workdir / "base.safetensors"
    if base_path.exists() and all(p.exists() for p in paths):
        return paths
    torch.manual_seed(0)
    tower = VisionTransformer(
        image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512
    )
    base = {f"visual.{k}": v.detach() for k, v in tower.state_dict().items()}
    save_state_dict(base, base_path)
    for t, path in enumerate(paths):
        if path.exists():
            continue
        gen = torch.Generator().manual_seed(t + 1)
        tuned = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        save_state_dict(tuned, path)
    return paths


def peak_gpu_mib() -> float | None:
    """torch's peak CUDA allocation in this process, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def run_phase(phase: str, paths: list[str], device: str = "cpu") -> dict:
    from mergeflow.cart_grid import CartFactors
    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.merge import merge_readers

    readers = [open_checkpoint(p) for p in paths]
    rss_before = _rss_mib("VmRSS")
    started = time.perf_counter()
    if phase == "one":
        merge_readers("cart", readers, params={"rank_ratio": 0.12, "scale": 1.0}, device=device)
        points = 1
    elif phase == "grid":
        factors = CartFactors.factorize(readers, max_rank_ratio=max(RANKS), device=device)
        factorized = time.perf_counter() - started
        for rank_ratio in RANKS:
            for scale in SCALES:
                factors.merge(rank_ratio, scale, device=device)
        points = len(RANKS) * len(SCALES)
    elif phase == "naive":
        for rank_ratio, scale in NAIVE_POINTS:
            merge_readers(
                "cart", readers, params={"rank_ratio": rank_ratio, "scale": scale}, device=device
            )
        points = len(NAIVE_POINTS)
    else:
        raise ValueError(phase)
    seconds = time.perf_counter() - started
    result = {
        "phase": phase,
        "seconds": seconds,
        "points": points,
        "peak_rss_mib": _rss_mib("VmHWM"),
        "rss_before_mib": rss_before,
        "peak_gpu_mib": peak_gpu_mib(),
    }
    if phase == "grid":
        result["factorize_seconds"] = factorized
        from mergeflow.svd import factors_bytes

        average_bytes = sum(v.numel() * v.element_size() for v in factors.average.values())
        result["factor_mib"] = (factors_bytes(factors.factors) + average_bytes) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.paths, args.device)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mergeflow-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    started = time.perf_counter()
    paths = prepare(workdir, args.tasks)
    size_mib = paths[0].stat().st_size / 2**20
    print(
        f"checkpoints: {args.tasks} x {size_mib:.0f} MiB (fp32) in {workdir}, "
        f"prepared in {time.perf_counter() - started:.0f} s"
    )

    results = {}
    for phase in ("one", "grid", "naive"):
        out = subprocess.run(
            [sys.executable, __file__, "--device", args.device, "--phase", phase, *map(str, paths)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[phase] = json.loads(out.stdout.strip().splitlines()[-1])

    one, grid, naive = results["one"], results["grid"], results["naive"]
    naive_per_point = naive["seconds"] / naive["points"]
    print()
    print(f"{'':38s} {'wall s':>9s} {'peak RSS MiB':>13s} {'at start MiB':>13s}")
    for label, r in (("(a) one CART merge (rank 0.12)", one), ("(b) 5x4 grid via factors", grid)):
        print(
            f"{label:38s} {r['seconds']:9.1f} {r['peak_rss_mib']:13.0f} {r['rss_before_mib']:13.0f}"
        )
    print(f"{'    of which factorize':38s} {grid['factorize_seconds']:9.1f}")
    print(
        f"{'    per grid point after factorizing':38s} "
        f"{(grid['seconds'] - grid['factorize_seconds']) / grid['points']:9.2f}"
    )
    print(
        f"{'(c) naive, per point (3 timed)':38s} {naive_per_point:9.1f} "
        f"{naive['peak_rss_mib']:13.0f} {naive['rss_before_mib']:13.0f}"
    )
    if grid["peak_gpu_mib"] is not None:
        print(
            "peak GPU memory MiB (torch allocations): "
            + ", ".join(f"{p} {results[p]['peak_gpu_mib']:.0f}" for p in ("one", "grid", "naive"))
        )
    print(
        f"factors held: {grid['factor_mib']:.0f} MiB (max rank ratio {max(RANKS)}, T={args.tasks})"
    )
    print(f"b/a = {grid['seconds'] / one['seconds']:.2f}   (target <= 1.15)")
    print(f"(c per point x 20)/b = {naive_per_point * 20 / grid['seconds']:.1f}")


if __name__ == "__main__":
    main()
