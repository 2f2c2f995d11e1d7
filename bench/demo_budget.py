"""The least time a first `make demo` can take on this machine: the demo's arithmetic,
counted from its own settings, over the fastest matrix multiply the machine does.

Nearly all of a first run is forward and backward passes of the zoo's image tower. This
script counts them from the settings the demo runs with (``zoo.zoo.ZooConfig``, the
training batch sizes in ``zoo.train``, ``flows.demo``'s families, baselines and continual
methods, the spec's split sizes), measures the tower's FLOPs per image with
``torch.utils.flop_counter`` (attention included: Prefect-free, open_clip's own model), and
divides each phase's FLOPs by the rate of a float32 matrix multiply of the tower's largest
shape on this machine's threads (the work's ceiling: every other op of the tower is slower
per FLOP). It prints, per phase, the images through the tower, the TFLOPs and the seconds at
that ceiling, then the total: a floor, as no run can do the same work faster. Counts are
lower bounds (a routed model's router pass, Fisher's per-sample backward, RegMean's Gram
matrices and every merge itself are left out).

Usage: ``python bench/demo_budget.py [--threads N]`` (no zoo needed; about 10 s).
"""

from __future__ import annotations

import argparse
import inspect
import time


def tower_flops(model_name: str) -> tuple[float, float, float]:
    """FLOPs per image of the image tower (forward; forward + backward, all weights
    trained) and per caption of the text tower (forward + backward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mergeflow.models import create_model, tokenizer_for

    model = create_model(model_name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(8, 3, size, size)
    # the inference fast path's fused attention is invisible to the counter
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval().encode_image(images)
        forward = counter.get_total_flops() / len(images)
        model.train()
        with FlopCounterMode(display=False) as counter:
            model.encode_image(images).sum().backward()
        train = counter.get_total_flops() / len(images)
        tokens = tokenizer_for(model_name)(["a photo of a digit 3"] * 8)
        with FlopCounterMode(display=False) as counter:
            model.encode_text(tokens).sum().backward()
        text = counter.get_total_flops() / 8
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    return forward, train, text


def matmul_rate(model_name: str, threads: int) -> float:
    """FLOP/s of a float32 matmul of the tower's largest shape (256 images' tokens by the
    width, times the width by three widths) on ``threads`` threads: the best of 5."""
    import open_clip
    import torch

    vision = open_clip.get_model_config(model_name)["vision_cfg"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    width = vision["width"]
    torch.set_num_threads(threads)
    a, b = torch.randn(256 * tokens, width), torch.randn(width, 3 * width)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best


def _default(function, parameter: str):
    return inspect.signature(function).parameters[parameter].default


def demo_work() -> list[tuple[str, int, int, int]]:
    """The demo's phases as (name, images forward only, images forward + backward,
    captions forward + backward)."""
    from flows import demo
    from mergeflow.methods import find_method
    from mergeflow.plan import make_plan
    from zoo import train
    from zoo.zoo import ZooConfig, zoo_spec

    config = ZooConfig()
    tasks, val, test = len(config.tasks), config.validation_size, config.test_size
    pretrained = config.pretrain_steps * _default(train.pretrain, "batch_size")
    finetuned = tasks * config.finetune_steps * _default(train.finetune_image_tower, "batch_size")
    phases = [
        ("zoo: pretraining", 0, pretrained, pretrained),
        ("zoo: fine-tuning", 2 * tasks * test, finetuned, 0),  # + each model's test accuracy
    ]

    # the spec the demo writes (zoo_spec's grid and the demo's families and baselines), for
    # a zoo of the same tasks; where its files would be does not change what is counted
    manifest = {
        "config": config.model_dump(mode="json"),
        "tasks": [{"name": n, "classes": ["a", "b"], "templates": ["{c}"]} for n in config.tasks],
    }
    spec = zoo_spec(
        manifest, "/budget", "budget", families=demo.DEMO_FAMILIES, baselines=demo.DEMO_BASELINES
    )
    plan = make_plan(spec)
    best_of_each = list({family: c for family, c in reversed(plan.grid)}.values())
    report = len(plan.report_candidates(best_of_each)) + 1  # + the CART index
    phases.append(("pipeline: grid on validation", len(plan.grid) * tasks * val, 0, 0))

    forward = backward = 0
    for candidate in plan.data_aware:
        params = find_method(candidate.name).params(**candidate.params)
        batch = tasks * getattr(params, "batch_size", 0)
        if candidate.name in ("adamerging", "cart_adamerging"):
            backward += params.steps * batch
            forward += 2 * tasks * params.samples  # entropy before and after
        elif candidate.name == "concrete":
            if params.over == "adamerging":  # a meta step is two passes, then AdaMerging
                backward += (2 * params.steps + params.adamerging_steps) * batch
            else:
                backward += params.steps * batch
            forward += 2 * tasks * params.samples
        elif candidate.name == "fisher":  # one backward per sample
            backward += tasks * params.samples
        elif candidate.name == "regmean":  # one forward per sample (the inputs' Grams)
            forward += tasks * params.samples
    phases.append(("pipeline: adaptations", forward, backward, 0))
    phases.append(("pipeline: report split", (report + 1) * tasks * test, 0, 0))  # + champion
    arrivals = sum(range(2, tasks + 1))
    phases.append(("continual curve", len(demo.CONTINUAL_METHODS) * arrivals * test, 0, 0))
    alignment = (len(demo.ALIGNMENT_METHODS) + 1) * 3 * 2 * test  # + PLeaS; three settings
    phases.append(("alignment comparison", alignment, 0, 0))
    return phases


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    from zoo.zoo import ZooConfig

    model = ZooConfig().model
    forward, train, text = tower_flops(model)
    rate = matmul_rate(model, args.threads)
    print(f"{model}: {forward / 1e6:.1f} MFLOP per image forward, {train / 1e6:.1f} forward + "
          f"backward; text tower {text / 1e6:.1f} per caption forward + backward")  # fmt: skip
    print(f"float32 matmul ceiling on {args.threads} threads: {rate / 1e9:.1f} GFLOP/s")
    print()
    print(f"{'phase':34s}{'forward':>10s}{'fwd+bwd':>10s}{'TFLOP':>8s}{'floor s':>9s}")
    total_flops = 0.0
    for name, images, trained, captions in demo_work():
        flops = images * forward + trained * train + captions * text
        total_flops += flops
        print(f"{name:34s}{images:>10,d}{trained:>10,d}{flops / 1e12:>8.1f}{flops / rate:>9.0f}")
    print(f"{'first make demo':34s}{'':>20s}{total_flops / 1e12:>8.1f}{total_flops / rate:>9.0f}")
    print()
    print(f"At the matmul ceiling, with no other op, no I/O and no overhead, the first run "
          f"takes at least {total_flops / rate:.0f} s ({total_flops / rate / 60:.1f} min) "
          f"on {args.threads} threads of this machine.")  # fmt: skip


if __name__ == "__main__":
    main()
