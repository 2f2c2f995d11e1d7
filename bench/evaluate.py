"""Time to score a 12-point CART grid on the demo zoo, split into its parts.

Prints: one-time work (decoding + preprocessing every selection split, building the heads,
factorizing), then per grid point the reconstruction (factors → weights) and the forward
passes (every task's selection split), everything else, and images per second.
Needs a built zoo: run `make demo` once (or pass --zoo DIR).
Usage: ``python bench/evaluate.py [--zoo .demo/zoo]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RANKS = (0.04, 0.08, 0.12, 0.16)
SCALES = (1.0, 1.5, 2.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path(__file__).parent.parent / ".demo" / "zoo")
    args = parser.parse_args()
    manifest_path = args.zoo / "zoo.json"
    if not manifest_path.is_file():
        raise SystemExit(f"no zoo at {args.zoo}: run `make demo` first (or pass --zoo)")

    import torch

    from mergeflow import evaluation
    from mergeflow.candidates import cart_point
    from mergeflow.evaluation import SELECTION
    from mergeflow.run import RunInputs, open_run
    from zoo.zoo import zoo_spec

    manifest = json.loads(manifest_path.read_text())
    spec = zoo_spec(manifest, str(args.zoo.resolve()), "bench", rank_ratios=RANKS, scales=SCALES)
    run = open_run(RunInputs.resolve(spec, tempfile.mkdtemp(prefix="mergeflow-bench-eval-")))
    print(f"zoo: {len(spec.tasks)} tasks, torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    context = run.context
    prepare_s = time.perf_counter() - t0
    images = sum(len(t.splits[SELECTION].labels) for t in context.tasks)
    t0 = time.perf_counter()
    run.factors_path()
    factorize_s = time.perf_counter() - t0
    print(
        f"one-time: prepare data + heads {prepare_s:.1f} s (cold cache), "
        f"factorize {factorize_s:.1f} s"
    )

    t_reconstruct = t_forward = 0.0
    started = time.perf_counter()
    for rank_ratio in RANKS:
        for scale in SCALES:
            t0 = time.perf_counter()
            state = cart_point(rank_ratio, scale).weights(run)
            t1 = time.perf_counter()
            context.score(state, SELECTION)
            t2 = time.perf_counter()
            t_reconstruct += t1 - t0
            t_forward += t2 - t1
    total = time.perf_counter() - started
    points = len(RANKS) * len(SCALES)
    other = total - t_reconstruct - t_forward
    print(f"grid of {points} points, {images} selection images each:")
    print(f"  total        {total:7.2f} s  ({total / points:.2f} s per point)")
    print(f"  reconstruct  {t_reconstruct:7.2f} s  ({100 * t_reconstruct / total:.0f}%)")
    print(f"  forward      {t_forward:7.2f} s  ({100 * t_forward / total:.0f}%)")
    print(f"  other        {other:7.2f} s  ({100 * other / total:.0f}%)")
    print(
        f"  throughput   {points * images / t_forward:7.0f} images/s (forward only), "
        f"{points * images / total:.0f} images/s overall"
    )

    t0 = time.perf_counter()
    evaluation._context.cache_clear()
    evaluation.evaluation_context(run.spec, run.cache)
    print(
        f"warm re-preparation from the on-disk cache: {time.perf_counter() - t0:.1f} s "
        f"(vs {prepare_s:.1f} s cold)"
    )


if __name__ == "__main__":
    main()
