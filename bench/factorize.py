"""How much faster the truncated SVD is than a full LAPACK SVD, and how close it stays.

For the weight matrices CART factorizes in two real shapes, the open_clip ViT-B/32 image tower
(12 blocks: 2304x768, 768x768, 3072x768, 768x3072) and a Llama-shaped model (hidden 1024,
intermediate 2816, 8 layers: four 1024x1024, two 2816x1024, one 1024x2816 per layer), prints
per shape and rank ratio the seconds of ``mergeflow.svd.truncated_svd`` (float64 Gram matrix +
top-k ``eigh``) beside ``torch.linalg.svd`` (what CART ran before), their ratio, and the
largest relative difference of the merged weights θ_avg + U_k S_k V_kᵀ (θ_avg 20x the task
vector's norm, as fine-tuning moves weights by a few percent) and of the low-rank part alone.
Then the whole model's factorization time per rank ratio (one task; T tasks cost T times it)
and the target: >= 2x. Timing is the median of ``--repeats`` runs on matrices with a task
vector's decaying spectrum. Usage: ``python bench/factorize.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.grid import machine_line  # noqa: E402
from mergeflow.svd import GRAM_MAX_SHARE, lapack_svd, low_rank_sum, rank_for, truncated_svd  # noqa: E402

MODELS = {
    "ViT-B/32 tower": {(2304, 768): 12, (768, 768): 12, (3072, 768): 12, (768, 3072): 12},
    "Llama 1024/2816 x8": {(1024, 1024): 32, (2816, 1024): 16, (1024, 2816): 8},
}
RATIOS = (0.04, 0.08, 0.12, 0.16, GRAM_MAX_SHARE)
TARGET = 2.0


def task_vector_like(m: int, n: int, seed: int) -> torch.Tensor:
    """A float32 (m, n) matrix whose singular values fall as i^-0.7 (a fine-tuning update's
    slow decay) over a little dense noise."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=gen))[0]
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.7
    return (u * s) @ v.T + 1e-4 * torch.randn(m, n, generator=gen) / max(m, n) ** 0.5


def seconds(fn, *args, repeats: int):
    """Median seconds of ``repeats`` calls of ``fn(*args)``, and the last call's result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(machine_line())
    shapes = sorted({shape for counts in MODELS.values() for shape in counts})
    lapack, fast = {}, {}
    worst_merged = worst_low_rank = 0.0
    print(
        f"{'shape':>11} {'ratio':>5} {'k':>4} {'LAPACK s':>9} {'fast s':>8} {'speed-up':>8}"
        f" {'merged rel. diff':>16} {'low-rank rel. diff':>18}"
    )
    for shape in shapes:
        tau = task_vector_like(*shape, seed=sum(shape))
        average = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        average *= 20 * tau.norm() / average.norm()
        # one full SVD serves every rank's reference (its cost does not depend on k)
        lapack[shape], full = seconds(lapack_svd, tau, min(shape), repeats=args.repeats)
        for ratio in RATIOS:
            k = rank_for(shape, ratio)
            fast[shape, ratio], factors = seconds(truncated_svd, tau, k, repeats=args.repeats)
            reference = low_rank_sum([full], k).double()
            got = low_rank_sum([factors], k).double()
            low_rank = float((got - reference).norm() / reference.norm())
            merged = float((got - reference).norm() / (average.double() + reference).norm())
            worst_merged, worst_low_rank = max(worst_merged, merged), max(worst_low_rank, low_rank)
            print(
                f"{shape[0]:>5}x{shape[1]:<5} {ratio:>5.2f} {k:>4} {lapack[shape]:>9.3f}"
                f" {fast[shape, ratio]:>8.3f} {lapack[shape] / fast[shape, ratio]:>7.2f}x"
                f" {merged:>16.1e} {low_rank:>18.1e}"
            )
    print(
        f"largest relative difference from the full SVD: merged weights {worst_merged:.1e}"
        f" (target <= 1e-5), low-rank part {worst_low_rank:.1e}"
    )
    for name, counts in MODELS.items():
        base = sum(count * lapack[shape] for shape, count in counts.items())
        line = [f"{name}, one task's matrices: LAPACK {base:.2f} s;"]
        for ratio in RATIOS:
            total = sum(count * fast[shape, ratio] for shape, count in counts.items())
            verdict = (
                "meets" if base / total >= TARGET else f"misses by {TARGET - base / total:.2f}x"
            )
            line.append(
                f"rank {ratio:.2f}: {total:.2f} s = {base / total:.2f}x ({verdict} {TARGET:.0f}x)"
            )
        print(" ".join(line[:1]) + "\n  " + "\n  ".join(line[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
