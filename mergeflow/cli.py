"""The ``mergeflow`` command line, a thin layer over the library.

    mergeflow merge --method cart --base BASE --finetuned A B C \\
        --param rank_ratio=0.12 --param scale=1.0 --out OUT
    mergeflow inspect CKPT
    mergeflow methods
    mergeflow compress --finetuned A B C --tasks a b c --out INDEX
    mergeflow rebuild INDEX --task b --out B
    mergeflow run SPEC.yaml [--json]
    mergeflow doctor

Bad input ends the command with exit status 2 and one line on stderr saying what is wrong.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mergeflow import __version__
from mergeflow.errors import MergeflowError, ParameterError
from mergeflow.outputs import DEFAULT_SHARD_SIZE

EXIT_BAD_INPUT = 2


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``mergeflow merge: error: ...``."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()


def _add_param_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--param", action="append", default=[], type=_parse_param, metavar="KEY=VALUE", help=help
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="mergeflow", description="Training-free model merging.")
    parser.add_argument("--version", action="version", version=f"mergeflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    merge = commands.add_parser(
        "merge",
        help="merge fine-tuned checkpoints into one",
        description="Merge fine-tuned checkpoints and write the result. A checkpoint is a "
        "safetensors or torch file, a sharded checkpoint's *.index.json, a model folder "
        "(model.safetensors, shards + index, pytorch_model.bin, a PEFT LoRA adapter), local, "
        "s3:// or hf://ORG/NAME[@REVISION]. --out x.safetensors writes one file; --out DIR "
        "a model folder (shards, index, config and tokenizer files from the base's folder, "
        "a model card); --out-format lora --rank R a PEFT adapter of the merged delta.",
    )
    merge.add_argument("--method", help="merge method (see `mergeflow methods`)")
    merge.add_argument(
        "--config",
        metavar="MERGE_YML",
        help="instead of --method, --base, --finetuned and --param: a mergekit merge config "
        "(merge_method task_arithmetic, ties, linear or passthrough; models, slices, "
        "parameters), run with mergeflow's methods",
    )
    merge.add_argument(
        "--base",
        help="the pre-trained checkpoint they share (needed by task-vector methods, unless "
        "they run with center=average)",
    )
    merge.add_argument("--finetuned", nargs="+", metavar="CKPT")
    _add_param_option(merge, "a method parameter, repeatable (e.g. rank_ratio=0.12, scale=1.0)")
    merge.add_argument(
        "--out", required=True, help="x.safetensors (one file) or a folder (a model folder)"
    )
    merge.add_argument(
        "--out-format",
        choices=["full", "lora"],
        default="full",
        help="full: the merged model (default); lora: a PEFT adapter of the merged delta "
        "(LoRA inputs only; needs --rank)",
    )
    merge.add_argument("--rank", type=int, help="rank of a --out-format lora adapter")
    merge.add_argument(
        "--shard-size",
        default=DEFAULT_SHARD_SIZE,
        help=f"largest shard of a folder output (default {DEFAULT_SHARD_SIZE}, as transformers)",
    )
    merge.add_argument(
        "--model",
        help="open_clip config of an open_clip merge, for a folder output's "
        "open_clip_config.json (default: the base folder's)",
    )
    merge.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    merge.add_argument(
        "--cache-dir", help="cache for remote checkpoints (default: ~/.cache/mergeflow)"
    )
    merge.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    commands.add_parser("methods", help="list the merge methods and their parameters")

    inspect = commands.add_parser(
        "inspect",
        help="say what a checkpoint is and how each method would treat its tensors",
        description="Print a checkpoint's format, detected architecture, dtypes, parameter "
        "count, shards, LoRA rank and targets, and which tensors each method family would "
        "low-rank, merge element-wise, or copy.",
    )
    inspect.add_argument("checkpoint", help="file, folder, s3:// or hf:// reference")
    inspect.add_argument("--base", help="the base a LoRA adapter adapts (to see the model)")
    inspect.add_argument("--json", action="store_true", help="print one JSON document")
    inspect.add_argument("--cache-dir", help="cache for remote checkpoints")

    compress = commands.add_parser(
        "compress",
        help="store T fine-tuned models as θ_avg plus rank-k factors (CART index)",
        description="Build a CART index: the weight average plus each task's rank-k centered "
        "task vector, one file from which `mergeflow rebuild` gives back any task's model.",
    )
    compress.add_argument("--finetuned", required=True, nargs="+", metavar="CKPT")
    compress.add_argument("--base", help="the base model, when the inputs are LoRA adapters")
    compress.add_argument(
        "--tasks", nargs="+", metavar="NAME", help="task names, in checkpoint order"
    )
    _add_param_option(compress, "rank_ratio (default 0.12), energy, include, exclude")
    compress.add_argument("--out", required=True, help="where to write the index")
    compress.add_argument("--device", default="auto", help="auto, cpu, cuda")
    compress.add_argument("--cache-dir", help="cache for remote checkpoints")
    compress.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    rebuild = commands.add_parser(
        "rebuild",
        help="write one task's model from a CART index",
        description="Rebuild task TASK's model from a CART index written by `mergeflow "
        "compress` and save it as safetensors.",
    )
    rebuild.add_argument("index", help="the CART index (path or URI)")
    rebuild.add_argument("--task", required=True, help="task name (or 0-based index)")
    rebuild.add_argument("--out", required=True, help="where to write the model")
    rebuild.add_argument("--device", default="auto", help="auto, cpu, cuda")

    run = commands.add_parser(
        "run",
        help="run the merge pipeline on a spec (Prefect flow)",
        description="Fetch the spec's checkpoints, sweep CART over its grid, score every point "
        "on every task, compare with the baselines and register the winner in MLflow "
        "(MLFLOW_TRACKING_URI). Runs the Prefect flow 'merge-pipeline'.",
    )
    run.add_argument("spec", help="merge spec, a YAML file")
    run.add_argument("--cache-dir", help="local cache (default: ~/.cache/mergeflow)")
    run.add_argument(
        "--json",
        action="store_true",
        help="print the run's report as one JSON document (for scripts) instead of text",
    )
    run.add_argument(
        "--dask",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="fan the scoring out over Dask: a scheduler address, or (no value) a local "
        "cluster of MERGEFLOW_DASK_WORKERS processes (default 2)",
    )

    align = commands.add_parser(
        "align",
        help="permute a model's units onto a reference's (weight matching), before a merge",
        description="For checkpoints that did not start from one base: find, by weight "
        "matching (no data), the permutations of an open_clip image tower's residual stream, "
        "MLP units and attention heads that bring MODEL closest to REFERENCE, and write MODEL "
        "permuted (the same function). Merge the aligned checkpoints as usual.",
    )
    align.add_argument("--reference", required=True, help="the checkpoint to align onto")
    align.add_argument("--model", required=True, help="the checkpoint to permute")
    align.add_argument("--heads", required=True, type=int, help="attention heads per block")
    align.add_argument("--out", required=True, help="where to write the aligned model")

    moe = commands.add_parser(
        "moe-merge",
        help="merge the experts of one mixture-of-experts model into fewer (MC-SMoE)",
        description="Read routing statistics of a Mixtral-style checkpoint on calibration "
        "sequences, keep each layer's most used experts, merge every other expert into its "
        "most similar kept one (aligned, usage-weighted) and write the smaller MoE as a "
        "transformers folder. Give a YAML spec, or the flags.",
    )
    moe.add_argument("spec", nargs="?", help="YAML spec: model, calibration, out, experts, ...")
    moe.add_argument("--model", help="the MoE model's folder (local or s3://)")
    moe.add_argument("--calibration", help=".jsonl of input_ids, or .txt of samples")
    moe.add_argument("--experts", type=int, help="experts per layer after merging")
    moe.add_argument("--out", help="folder to write the smaller model to")
    moe.add_argument("--samples", type=int, help="calibration sequences to read (256)")
    moe.add_argument("--max-tokens", type=int, help="tokens per sequence at most (512)")
    moe.add_argument("--no-align", action="store_true", help="skip the expert permutation")

    arrivals = commands.add_parser(
        "arrivals",
        help="take in the checkpoints that landed under a prefix since the last run (Prefect flow)",
        description="List the arrivals spec's prefix, fold each checkpoint not taken in yet "
        "into the running merge (mode: continual) or merge all again (mode: full), score it "
        "on every task seen so far and register it as challenger (champion moves through the "
        "gate). Runs the Prefect flow 'merge-arrivals'; a run with nothing new does nothing.",
    )
    arrivals.add_argument("spec", help="arrivals spec, a YAML file")
    arrivals.add_argument("--cache-dir", help="local cache (default: ~/.cache/mergeflow)")

    doctor = commands.add_parser(
        "doctor",
        help="check that the stores are reachable and writable and the stack is as pinned",
        description="Write a probe to the cache, the result store and the artifact root, "
        "query the MLflow tracking store, and compare the key packages with constraints.txt; "
        "one line per check, exit status 1 if any fails.",
    )
    doctor.add_argument("--cache-dir", help="local cache (default: ~/.cache/mergeflow)")

    score = commands.add_parser(
        "score-model",
        help="score a registered model on a spec's report splits",
        description="Load MODEL (models:/NAME@champion, models:/NAME/3) from the MLflow "
        "registry (MLFLOW_TRACKING_URI) and print its accuracy on each task of the spec.",
    )
    score.add_argument("model", help="model URI, e.g. models:/mergeflow-demo@champion")
    score.add_argument("--spec", required=True, help="merge spec whose tasks to score on")
    score.add_argument("--split", choices=["report", "selection"], default="report")
    score.add_argument("--cache-dir", help="local cache (default: ~/.cache/mergeflow)")

    promote = commands.add_parser(
        "promote",
        help="move champion to a version if it beats the champion (Prefect flow)",
        description="Score VERSION (default: the challenger) and the champion of the spec's "
        "registered model on the spec's report splits; champion moves only to a higher score.",
    )
    promote.add_argument("spec", help="merge spec, a YAML file")
    promote.add_argument("--version", help="version number or alias (default: challenger)")
    promote.add_argument("--model-name", help="registered model (default: the spec's)")
    promote.add_argument("--cache-dir", help="local cache (default: ~/.cache/mergeflow)")
    return parser


def _params(pairs: list[tuple[str, str]]) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise MergeflowError(f"parameter {key!r} given twice")
        params[key] = value
    return params


def _run_merge(args: argparse.Namespace) -> int:
    from mergeflow.merge import merge_files
    from mergeflow.storage import CheckpointCache

    method, base, finetuned, params = args.method, args.base, args.finetuned, _params(args.param)
    if args.config:
        from mergeflow.mergekit_config import read_config

        if method or finetuned or params or base:
            raise MergeflowError("--config holds the method, models and parameters: give it alone")
        merge = read_config(args.config)
        method, base, finetuned, params = merge.method, merge.base, merge.finetuned, merge.params
        for note in merge.notes:
            print(f"note: {note}", file=sys.stderr)
    elif not method or not finetuned:
        raise MergeflowError("give --method and --finetuned (or a mergekit --config)")
    report = merge_files(
        method=method,
        base=base,
        finetuned=finetuned,
        params=params,
        out=args.out,
        device=args.device,
        cache=CheckpointCache(args.cache_dir) if args.cache_dir else None,
        progress=not args.quiet,
        out_format=args.out_format,
        shard_size=args.shard_size,
        rank=args.rank,
        model_config=args.model,
    )
    shown = [
        k for k, v in report.params.items() if k not in ("include", "exclude") and v is not None
    ]
    described = " ".join([report.method] + [f"{k}={report.params[k]}" for k in shown])
    print(
        f"wrote {report.out}: {described} merge of {len(finetuned)} checkpoints, "
        f"{report.num_tensors} tensors ({report.counts.describe()}), "
        f"{report.num_bytes / 2**20:.1f} MiB, {report.seconds:.1f} s"
    )
    if report.files:
        print(f"  files: {', '.join(report.files)}")
    for note in report.notes:
        print(f"  note: {note}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    import json

    from mergeflow.inspection import inspect_checkpoint
    from mergeflow.storage import CheckpointCache

    cache = CheckpointCache(args.cache_dir) if args.cache_dir else None
    found = inspect_checkpoint(args.checkpoint, args.base, cache)
    print(json.dumps(found.to_json(), indent=2) if args.json else found.render())
    return 0


def _runner(name: str):
    from importlib.metadata import entry_points

    runners = entry_points(group="mergeflow.runners", name=name)
    if not runners:
        raise MergeflowError(f"the {name} runner is not installed (pip install -e . in the repo)")
    return next(iter(runners)).load()


def _run_pipeline(args: argparse.Namespace) -> int:
    from mergeflow.spec import MergeSpec

    MergeSpec.from_yaml(args.spec)  # fail on a bad spec before starting any orchestration
    from mergeflow import report

    result = _runner("pipeline")(args.spec, args.cache_dir, dask=args.dask)
    print(report.json_document(result) if args.json else report.text(result))
    return 0


def _run_align(args: argparse.Namespace) -> int:
    from mergeflow.align import match_weights
    from mergeflow.checkpoints import load_state_dict, save_state_dict

    reference, model = load_state_dict(args.reference), load_state_dict(args.model)
    aligned, _ = match_weights(reference, model, args.heads)

    def distance(state):
        return sum(float((state[k].double() - reference[k].double()).square().sum())
                   for k in reference) ** 0.5  # fmt: skip

    save_state_dict(aligned, args.out, {"mergeflow.aligned_to": str(args.reference)})
    print(f"wrote {args.out}: {args.model} permuted onto {args.reference}; distance "
          f"{distance(model):.4g} -> {distance(aligned):.4g}")  # fmt: skip
    return 0


def _run_moe_merge(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from mergeflow.moe import MoeMergeSpec, moe_merge

    fields = {"model": args.model, "calibration": args.calibration, "experts": args.experts,
              "out": args.out, "samples": args.samples, "max_tokens": args.max_tokens}  # fmt: skip
    given = {k: v for k, v in fields.items() if v is not None}
    if args.no_align:
        given["align"] = False
    raw = {}
    if args.spec:
        from mergeflow.storage import CheckpointCache

        try:
            raw = yaml.safe_load(CheckpointCache().fetch(args.spec).path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ParameterError(f"{args.spec}: not YAML ({exc})") from None
        if not isinstance(raw, dict):
            raise ParameterError(f"{args.spec}: a moe-merge spec is a mapping of fields")
    try:
        spec = MoeMergeSpec(**{**raw, **given})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ParameterError(f"{args.spec or 'moe-merge'}: {where}: {err['msg']}") from None
    moe_merge(spec)
    return 0


def _run_arrivals(args: argparse.Namespace) -> int:
    import json

    from mergeflow.arrivals import ArrivalsSpec

    ArrivalsSpec.load(args.spec)  # a bad spec fails before any orchestration starts
    result = _runner("arrivals")(args.spec, args.cache_dir)
    shown = {k: result.get(k) for k in ("new", "taken_in", "scores", "version")}
    print(json.dumps(shown, indent=2))
    return 0


def _run_doctor(args: argparse.Namespace) -> int:
    from mergeflow import doctor, stores

    where = stores.current(args.cache_dir)
    checks = doctor.diagnose(where, doctor.default_pins_file())
    for check in checks:
        print(check.line())
    return 0 if all(c.ok for c in checks) else 1


def _run_score_model(args: argparse.Namespace) -> int:
    from mergeflow import pipeline
    from mergeflow.run import RunInputs, open_run
    from mergeflow.spec import MergeSpec
    from mergeflow.tracking import score_of

    run = open_run(RunInputs.resolve(MergeSpec.from_yaml(args.spec), args.cache_dir))
    # the choices are the evaluation's split roles themselves ("report", "selection")
    scores = pipeline.registered_model_scores(run, args.model, args.split)
    summary = pipeline.summary_of(run, scores, args.split)
    for task, acc in scores.items():
        normalized = summary["normalized"][task]
        print(f"{task:20s} accuracy {acc:.4f}  normalized {normalized:.4f}")
    print(
        f"{'mean':20s} accuracy {summary['mean_accuracy']:.4f}  "
        f"normalized {summary['mean_normalized']:.4f}  (score {score_of(summary):.4f})"
    )
    return 0


def _run_promote(args: argparse.Namespace) -> int:
    from mergeflow.spec import MergeSpec

    MergeSpec.from_yaml(args.spec)
    result = _runner("promote")(args.spec, args.version, args.model_name, args.cache_dir)
    state = "promoted to champion" if result["promoted"] else "not promoted"
    print(
        f"models:/{result['name']}/{result['version']}: {state} "
        f"({result['score']:.4f} against champion {result['champion_score']:.4f})"
    )
    return 0


def _run_compress(args: argparse.Namespace) -> int:
    from mergeflow.cart_index import compress_files
    from mergeflow.storage import CheckpointCache

    tasks = args.tasks or [f"task{i}" for i in range(len(args.finetuned))]
    if len(tasks) != len(args.finetuned):
        raise MergeflowError(f"{len(tasks)} --tasks for {len(args.finetuned)} --finetuned")
    report = compress_files(
        args.finetuned,
        tasks,
        _params(args.param),
        args.out,
        device=args.device,
        cache=CheckpointCache(args.cache_dir) if args.cache_dir else None,
        progress=not args.quiet,
        base=args.base,
    )
    print(
        f"wrote {args.out}: {len(tasks)} tasks in {report['index_bytes'] / 2**20:.1f} MiB, "
        f"{report['ratio']:.3f} of the {report['checkpoint_bytes'] / 2**20:.1f} MiB "
        "of fine-tuned checkpoints"
    )
    return 0


def _run_rebuild(args: argparse.Namespace) -> int:
    from mergeflow.cart_index import CartIndex
    from mergeflow.checkpoints import save_state_dict

    index = CartIndex.load(args.index)
    task = int(args.task) if args.task.isdigit() and args.task not in index.tasks else args.task
    save_state_dict(
        index.rebuild(task, device=args.device),
        args.out,
        {"mergeflow.method": "cart_indexed", "mergeflow.task": str(task)},
    )
    print(f"wrote {args.out}: task {task} rebuilt from {args.index}")
    return 0


def _run_methods() -> int:
    from mergeflow.continual import CONTINUAL
    from mergeflow.methods import METHODS, all_methods

    for name, method in sorted(all_methods().items()):
        needs = "" if name in METHODS else " [needs samples: pipeline only]"
        print(f"{name:18s} {method.summary}{needs}")
        print(f"{'':18s} params: {method.describe_params()}")
        print(f"{'':18s} {method.reference}")
    print("\ncontinual methods (an arrivals spec's method, mode: continual):")
    for name, method in sorted(CONTINUAL.items()):
        print(f"{name:18s} {method.summary}")
        print(f"{'':18s} params: {method.describe_params()}")
    print("\nbefore a merge, and inside one model:")
    print(f"{'align':18s} weight matching: an open_clip tower permuted onto another's, the "
          "same function (mergeflow align; a spec's align: {reference, heads})")  # fmt: skip
    print(f"{'':18s} Ainsworth et al., Git Re-Basin, ICLR 2023")
    print(f"{'mc_smoe':18s} fewer experts in one Mixtral-style MoE, grouped and merged by its "
          "routing on calibration samples (mergeflow moe-merge)")  # fmt: skip
    print(f"{'':18s} Li et al., Merge, Then Compress (MC-SMoE), ICLR 2024")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "merge":
            return _run_merge(args)
        if args.command == "run":
            return _run_pipeline(args)
        if args.command == "align":
            return _run_align(args)
        if args.command == "arrivals":
            return _run_arrivals(args)
        if args.command == "moe-merge":
            return _run_moe_merge(args)
        if args.command == "doctor":
            return _run_doctor(args)
        if args.command == "score-model":
            return _run_score_model(args)
        if args.command == "promote":
            return _run_promote(args)
        if args.command == "compress":
            return _run_compress(args)
        if args.command == "rebuild":
            return _run_rebuild(args)
        if args.command == "inspect":
            return _run_inspect(args)
        return _run_methods()
    except MergeflowError as exc:
        print(f"mergeflow {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"mergeflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
