"""Peak memory of a streaming merge as the number of fine-tuned checkpoints grows.

On ViT-B/32-shaped image towers (open_clip names, fp32, 88M parameters, written as
safetensors), runs one merge per T in 2, 4, 8, 16, each in its own process, and prints peak
RSS (VmHWM) next to the size of one checkpoint and of all T. A merge reads tensor by tensor,
so peak memory should be the output plus a few tensors per task: going from T = 2 to T = 16
should add less than one checkpoint's size. TIES is measured too: its model-wide trim
threshold takes two extra streaming passes, not a flattened model.

With ``--device cuda`` the merges run there and the peak GPU memory is printed too.

With ``--llama 1b`` it measures the streamed, sharded output instead: task arithmetic of
T = 4 bf16 Llama models of TinyLlama's dimensions (1.1B parameters, 2.2 GB each) into 500 MB
shards, mergeflow's peak RSS beside mergekit's on the same input (``bench/peers.py`` makes
the inputs and mergekit's venv); the target is under 1.5 GB, less than the model.

Usage: ``python bench/memory.py [--workdir DIR] [--methods cart,ties] [--tasks 2,4,8,16]
[--device cpu|cuda] [--llama 156m|1b]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grid import _rss_mib, machine_line, peak_gpu_mib, prepare

PARAMS = {"cart": {"rank_ratio": 0.12, "scale": 1.0}, "ties": {"density": 0.2, "scale": 1.0}}


def run_child(method: str, base: str, paths: list[str], out: str, device: str = "cpu") -> dict:
    from mergeflow.merge import merge_files

    rss_start = _rss_mib("VmRSS")
    started = time.perf_counter()
    uses_base = method != "cart"
    merge_files(method, base if uses_base else None, paths, PARAMS[method], out, device=device)
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss_mib": _rss_mib("VmHWM"),
        "rss_start_mib": rss_start,
        "peak_gpu_mib": peak_gpu_mib(),
    }


LLAMA_TARGET_BYTES = 1.5e9


def run_llama(size: str, workdir: Path | None) -> None:
    """Peak RSS of a streamed task-arithmetic merge into 500 MB shards, beside mergekit's."""
    from peers import TASKS_LLAMA, llama_commands, timed

    workdir = workdir or Path(__file__).resolve().parent.parent / ".bench" / "peers"
    workdir.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    ours, kit, ours_out, kit_out = llama_commands("ta", workdir, size, shard_size="500MB")
    model_mib = (workdir / f"llama-{size}" / "base" / "model.safetensors").stat().st_size / 2**20
    print(
        f"task arithmetic, Llama {size}, T={TASKS_LLAMA}, bf16, one model {model_mib:.0f} MiB, "
        "500 MB shards"
    )
    results = {}
    for name, command in (("mergeflow", ours), ("mergekit", kit)):
        results[name] = timed(command, workdir / f"memory-{name}-{size}.log")
        shards = len(list((ours_out if name == "mergeflow" else kit_out).glob("*.safetensors")))
        r = results[name]
        print(f"{name:9s} peak RSS {r.rss_mib:7.0f} MiB  wall {r.wall:6.1f} s  {shards} shards")
    peak = results["mergeflow"].rss_mib
    target_mib = LLAMA_TARGET_BYTES / 2**20
    print(
        f"mergeflow / mergekit peak RSS = {peak / results['mergekit'].rss_mib:.2f}; target "
        f"< 1.5 GB ({target_mib:.0f} MiB): {'met' if peak < target_mib else 'NOT met'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--methods", default="cart,ties")
    parser.add_argument("--tasks", default="2,4,8,16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--llama", choices=("156m", "1b"), help="the sharded-output check")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        base, out, *paths = args.paths
        print(json.dumps(run_child(args.child, base, paths, out, args.device)))
        return
    if args.llama:
        run_llama(args.llama, args.workdir)
        return

    counts = [int(t) for t in args.tasks.split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mergeflow-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    started = time.perf_counter()
    paths = prepare(workdir, max(counts))
    checkpoint_mib = paths[0].stat().st_size / 2**20
    print(
        f"checkpoints: {max(counts)} x {checkpoint_mib:.0f} MiB (fp32 ViT-B/32 image tower) in "
        f"{workdir}, ready in {time.perf_counter() - started:.0f} s"
    )
    print()
    header = f"{'method':7s} {'T':>3s} {'all ckpts MiB':>14s} {'peak RSS MiB':>13s}"
    print(header + f" {'at start MiB':>13s} {'wall s':>8s}")
    for method in args.methods.split(","):
        peaks = {}
        for count in counts:
            out = workdir / f"merged-{method}.safetensors"
            command = [
                sys.executable,
                __file__,
                "--device",
                args.device,
                "--child",
                method,
                str(workdir / "base.safetensors"),
            ]
            result = subprocess.run(
                command + [str(out), *map(str, paths[:count])],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(result.stdout.strip().splitlines()[-1])
            peaks[count] = r["peak_rss_mib"]
            print(
                f"{method:7s} {count:3d} {count * checkpoint_mib:14.0f} {r['peak_rss_mib']:13.0f} "
                f"{r['rss_start_mib']:13.0f} {r['seconds']:8.1f}"
                + ("" if r["peak_gpu_mib"] is None else f"  GPU peak {r['peak_gpu_mib']:.0f} MiB"),
                flush=True,
            )
        growth = peaks[max(counts)] - peaks[min(counts)]
        verdict = "met" if growth < checkpoint_mib else "NOT met"
        print(
            f"{method}: T={min(counts)} -> T={max(counts)} adds {growth:.0f} MiB of peak RSS; "
            f"one checkpoint is {checkpoint_mib:.0f} MiB (target: less than one checkpoint, "
            f"{verdict})"
        )


if __name__ == "__main__":
    main()
