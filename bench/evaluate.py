"""Time to score a 12-point CART grid on the demo zoo, split into its parts; or, with
``--model``, the pipeline's scoring loop at a real model's size.

Zoo mode prints: one-time work (decoding + preprocessing every selection split, building the
heads, factorizing), then per grid point the reconstruction (factors → weights) and the
forward passes (every task's selection split), everything else, and images per second.
Needs a built zoo: run `make demo` once (or pass --zoo DIR).

Model mode (``--model ViT-B-32``: an open_clip config, random weights, synthetic 224x224
images, a 10-class head) prints images/s of ``mergeflow.evaluation.correctness`` (what every
candidate is scored with) beside a plain ``encode_image`` loop under ``inference_mode`` on
the same batches, their ratio (target >= 0.95), and what bf16 autocast, channels-last and
``torch.compile`` do to the plain loop, each with the share of predictions unchanged.
Usage: ``python bench/evaluate.py [--zoo .demo/zoo | --model ViT-B-32 [--images 512]]``.
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
    parser.add_argument("--model", help="an open_clip config: time scoring at its size")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    if args.model:
        return at_model_size(args.model, args.images, args.batch_size)
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


def images_per_second(loop, images: int, repeats: int = 3):
    """Best of ``repeats`` timed runs after one warm-up; returns (images/s, predictions)."""
    predictions = loop()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        loop()
        best = min(best, time.perf_counter() - start)
    return images / best, predictions


def at_model_size(config: str, count: int, batch_size: int) -> None:
    import open_clip
    import torch

    from mergeflow.data import PreparedSplit
    from mergeflow.evaluation import SELECTION, PreparedTask, correctness

    torch.manual_seed(0)
    model = open_clip.create_model(config, pretrained=None).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(count, 3, size, size)
    labels = torch.randint(0, 10, (count,))
    head = torch.nn.functional.normalize(torch.randn(10, model.text_projection.shape[1]), dim=-1)
    split = PreparedSplit(images, labels, None, "synthetic")
    task = PreparedTask("synthetic", tuple(map(str, range(10))), head, {SELECTION: split})
    print(
        f"{config}: {count} synthetic {size}x{size} images, batch {batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )

    def plain(encode=model.encode_image, transform=lambda x: x, autocast=False):
        def loop():
            out = []
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                for start in range(0, count, batch_size):
                    features = encode(transform(images[start : start + batch_size])).float()
                    features = features / features.norm(dim=-1, keepdim=True)
                    out.append((features @ head.T).argmax(1))
            return torch.cat(out)

        return loop

    pipeline_rate, pipeline_pred = images_per_second(
        lambda: torch.from_numpy(correctness(model, task, SELECTION, batch_size, "cpu")), count
    )
    plain_rate, plain_pred = images_per_second(plain(), count)
    print(f"  pipeline scoring loop (correctness)  {pipeline_rate:7.1f} images/s")
    print(f"  plain encode_image, inference_mode   {plain_rate:7.1f} images/s")
    ratio = pipeline_rate / plain_rate
    verdict = "meets" if ratio >= 0.95 else f"misses by {0.95 - ratio:.2f}"
    print(f"  ratio pipeline / plain: {ratio:.2f} ({verdict} the target 0.95)")
    reference = plain_pred
    right = pipeline_pred.float().mean()  # correctness gives right/wrong per image
    assert bool((pipeline_pred == (reference == labels)).all()), "the loops disagree"
    print(f"  (both loops give the same {100 * right:.1f}% on the random labels)")

    tries = {
        "bf16 autocast": dict(autocast=True),
        "channels-last": dict(transform=lambda x: x.contiguous(memory_format=torch.channels_last)),
    }
    for name, options in tries.items():
        rate, predicted = images_per_second(plain(**options), count)
        same = (predicted == reference).float().mean()
        print(
            f"  {name:36s} {rate:7.1f} images/s ({rate / plain_rate:.2f}x), "
            f"{100 * same:.1f}% of predictions unchanged"
        )
    try:
        compiled = torch.compile(model.encode_image)
        start = time.perf_counter()
        rate, predicted = images_per_second(plain(encode=compiled), count)
        same = (predicted == reference).float().mean()
        print(
            f"  {'torch.compile':36s} {rate:7.1f} images/s ({rate / plain_rate:.2f}x), "
            f"{100 * same:.1f}% unchanged, {time.perf_counter() - start:.0f} s with compiling"
        )
    except Exception as exc:  # a compiler missing here is a finding, not a crash
        print(f"  torch.compile: not available here ({type(exc).__name__}: {exc})"[:200])


if __name__ == "__main__":
    main()
