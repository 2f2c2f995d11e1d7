"""The merge pipeline: checkpoints → CART rank grid (and other method families) → per-task
scores → MLflow registry.

mergeflow run SPEC.yaml [--dask [ADDRESS]]   (or deploy it: prefect.yaml)

Every costly step is kept by content in the result store (``$MERGEFLOW_RESULT_STORE``), so a
re-run of a spec recomputes nothing and a killed run resumes; the grid's and the report's
scoring fan out over the flow's task runner (threads by default, a Dask cluster with
``flows.dask_pipeline``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from mergeflow.checks import describe_distances
from mergeflow.evaluation import REPORT, SELECTION, summarize
from mergeflow.pipeline import is_data_aware, is_per_task
from mergeflow.spec import MergeSpec
from mergeflow.storage import CheckpointCache
from tasks.checkpoints import fetch_checkpoint
from tasks.pipeline import (
    check_bases,
    compress_checkpoints,
    draw_charts,
    evaluate_grid_point,
    factorize_checkpoints,
    merge_with_data,
    prepare_evaluation,
    read_adaptation,
    register_index,
    register_winner,
    score_candidate,
    score_index,
)


def _pick_best(grid: list[dict]) -> dict:
    """The grid point with the best mean normalized accuracy; ties go to CART, then the lower
    rank, then the smaller scale (cheaper to store, closer to averaging)."""

    def preference(point: dict):
        params = point["params"]
        return (
            point["mean_normalized"],
            point["method"] == "cart",
            -params.get("rank_ratio", 0.0),
            -params.get("scale", 0.0),
        )

    return max(grid, key=preference)


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def cart_candidate(rank_ratio: float, scale: float) -> dict:
    return {
        "method": "cart",
        "params": {"rank_ratio": rank_ratio, "scale": scale},
        "label": f"cart rank_ratio={rank_ratio} scale={scale}",
    }


def grid_candidates(spec: MergeSpec) -> tuple[dict[str, list[dict]], list[dict]]:
    """The grid's families (name → points) and every point with its family's name."""
    families = {"cart": [cart_candidate(r, s) for r, s in spec.grid.points()]}
    for family in spec.grid.families:
        name = family.label or family.method
        if name in families:
            name = f"{name} {len(families)}"
        families[name] = [point.candidate() for point in family.points()]
    candidates = [{**c, "family": name} for name, points in families.items() for c in points]
    return families, candidates


def data_aware_candidates(spec: MergeSpec) -> list[dict]:
    """The spec's candidates that read samples (grid points and baselines), each once."""
    _, candidates = grid_candidates(spec)
    chosen = [c for c in candidates if is_data_aware(c["method"])]
    chosen += [b.candidate() for b in spec.baseline_methods() if is_data_aware(b.method)]
    unique = {}
    for candidate in chosen:
        recipe = json.dumps([candidate["method"], candidate["params"]], sort_keys=True)
        unique.setdefault(recipe, candidate)
    return list(unique.values())


def _lineage(spec: MergeSpec, fetched: list[dict]) -> dict[str, str]:
    """Registry tags: where each checkpoint came from and its digest, the Prefect run."""
    lineage = {}
    for info in fetched:
        uri = info["uri"]
        role = (
            "base" if uri == spec.base else next(t.name for t in spec.tasks if t.checkpoint == uri)
        )
        lineage[f"source.{role}.uri"] = uri
        lineage[f"source.{role}.sha256"] = info["sha256"]
    if flow_run.id:
        lineage["prefect.flow_run_id"] = str(flow_run.id)
    if deployment.id:
        lineage["prefect.deployment"] = f"{flow_run.flow_name}/{deployment.name}"
    return lineage


class _Progress:
    """A Prefect progress artifact that follows the grid (0 → 100 %)."""

    def __init__(self, key: str, total: int, description: str):
        self.total, self.done = total, 0
        self.id = create_progress_artifact(progress=0.0, key=key, description=description)

    def step(self) -> None:
        self.done += 1
        update_progress_artifact(self.id, 100.0 * self.done / self.total)


@flow(name="merge-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=4))
def merge_pipeline(
    spec: MergeSpec,
    cache_dir: str | None = None,
    gpu_deployment: str | None = None,
) -> dict:
    """Merge the spec's fine-tuned checkpoints with CART over its rank grid (and any other
    method families it lists), score every point on each task's selection split, compare
    the best with the baselines on the report split, and register it in MLflow.

    Args:
        spec: what to merge (base and fine-tuned checkpoints, each task's dataset), the grid
            to search, the baselines to compare with, and the registered model's name.
        cache_dir: local cache folder for fetched files and prepared images (default:
            $MERGEFLOW_CACHE_DIR, else ~/.cache/mergeflow).
        gpu_deployment: run the SVD factorization as this deployment (on the GPU pool)
            first; the pipeline then reads its result from the shared result store.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    uris = [spec.base] + [t.checkpoint for t in spec.tasks]
    fetched = [f.result() for f in [fetch_checkpoint.submit(uri, cache_dir) for uri in uris]]
    lineage = _lineage(spec, fetched)
    distances = check_bases(spec, cache_dir)
    if distances:
        logger.info("distance from the base: %s", describe_distances(distances))
    sizes = prepare_evaluation(spec, cache_dir)
    logger.info("evaluation data ready: %s", sizes)

    finetuned = {"method": "finetuned", "params": {}, "label": "finetuned"}
    finetuned_selection = score_candidate(spec, finetuned, SELECTION, cache_dir=cache_dir)

    if gpu_deployment:
        _run_gpu_part(gpu_deployment, spec)
    factors_path = factorize_checkpoints(spec, cache_dir)
    # the data-aware merges start now, beside the grid; what scores them waits for them
    adapted = [merge_with_data.submit(spec, c, cache_dir) for c in data_aware_candidates(spec)]
    families, candidates = grid_candidates(spec)
    key = _artifact_key(spec.registered_model)
    progress = _Progress(
        f"{key}-progress", len(candidates), f"Grid of {spec.registered_model} on selection splits"
    )
    futures = {}
    for i, candidate in enumerate(candidates):
        if candidate["method"] == "cart":
            params = candidate["params"]
            future = evaluate_grid_point.submit(
                spec, factors_path, params["rank_ratio"], params["scale"], cache_dir
            )
        else:
            future = score_candidate.submit(
                spec,
                candidate,
                SELECTION,
                factors_path,
                cache_dir,
                wait_for=adapted if is_data_aware(candidate["method"]) else None,
            )
        futures[future] = i
    summaries = {}
    for future in as_completed(list(futures)):
        i = futures[future]
        summary = summaries[i] = summarize(future.result(), finetuned_selection)
        progress.step()
        print(
            f"grid {progress.done}/{len(candidates)}: {candidates[i]['label']} "
            f"mean acc {summary['mean_accuracy']:.3f} normalized {summary['mean_normalized']:.3f}"
        )
    grid = [
        {**candidate, **candidate["params"], **summaries[i]}
        for i, candidate in enumerate(candidates)
    ]
    # each family's best point on the selection splits goes to the report; the best of those
    # that are one merged model is registered
    family_best = {name: _pick_best([p for p in grid if p["family"] == name]) for name in families}
    mergeable = [p for p in family_best.values() if not is_per_task(p["method"])]
    best = _pick_best(mergeable)
    winner = {k: best[k] for k in ("method", "params", "label")}
    print(f"selected {winner['label']}")

    # the report split: each family's best point, the baselines, the references
    report = {
        p["label"]: {k: p[k] for k in ("method", "params", "label")} for p in family_best.values()
    }
    report.update({b.name: b.candidate() for b in spec.baseline_methods()})
    pending = {}
    for name in ("finetuned", "zeroshot"):
        if spec.has_reference(name):
            reference_candidate = {"method": name, "params": {}, "label": name}
            pending[name] = score_candidate.submit(
                spec, reference_candidate, REPORT, cache_dir=cache_dir
            )
    for name, candidate in report.items():
        waits = adapted if is_data_aware(candidate["method"]) else None
        pending[name] = score_candidate.submit(
            spec, candidate, REPORT, factors_path, cache_dir, wait_for=waits
        )
    report_scores = {name: future.result() for name, future in pending.items()}
    compression = None
    if spec.compression is not None:
        compression = compress_checkpoints(spec, cache_dir)
        settings = spec.compression.model_dump(exclude={"register_model"}, exclude_none=True)
        label = "cart_indexed " + " ".join(f"{k}={v}" for k, v in settings.items())
        compression["label"] = label
        report[label] = {"method": "cart_indexed", "params": settings, "label": label}
        report_scores[label] = score_index(spec, compression["path"], REPORT, cache_dir)
    reference = report_scores.get("finetuned") or {t.name: math.nan for t in spec.tasks}
    comparison = {name: summarize(scores, reference) for name, scores in report_scores.items()}
    # the report keeps data-free merges, data-aware ones and the references apart
    for name, summary in comparison.items():
        if name not in report:
            summary["kind"] = "reference"
        elif is_data_aware(report[name]["method"]):
            summary["kind"] = "data-aware"
            summary["adaptation"] = read_adaptation(spec, report[name], cache_dir)
        elif is_per_task(report[name]["method"]):
            summary["kind"] = "per-task"  # one model per task: compression, not a merge
        else:
            summary["kind"] = "data-free"

    charts = draw_charts(spec, grid, comparison, _report_folder(cache_dir, key))
    registration = register_winner(
        spec, factors_path, winner, grid, comparison, lineage, charts, cache_dir
    )
    if compression is not None and spec.compression.register_model:
        compression["registration"] = register_index(
            spec, compression, comparison[compression["label"]], lineage, cache_dir
        )

    key = _artifact_key(spec.registered_model)
    create_table_artifact(
        key=f"{key}-grid",
        table=[
            {
                "candidate": p["label"],
                "mean_accuracy": round(p["mean_accuracy"], 4),
                "mean_normalized": round(p["mean_normalized"], 4),
            }
            for p in grid
        ],
        description=f"Grid on the selection splits of {spec.registered_model}",
    )
    rows = [
        {
            "method": name,
            **{t: round(s["accuracy"][t], 4) for t in s["accuracy"]},
            "mean": round(s["mean_accuracy"], 4),
        }
        for name, s in comparison.items()
    ]
    create_table_artifact(
        key=f"{key}-comparison",
        table=rows,
        description="Report-split accuracy per task and method",
    )
    storage = ""
    if compression is not None:
        storage = (
            f"\n\nCART index ({compression['label']}): "
            f"{compression['index_bytes'] / 2**20:.1f} MiB for {len(spec.tasks)} tasks, "
            f"{compression['ratio']:.3f} of the fine-tuned checkpoints' "
            f"{compression['checkpoint_bytes'] / 2**20:.1f} MiB"
        )
    create_markdown_artifact(
        key=f"{key}-report",
        markdown=_report_markdown(spec, winner, registration, comparison, charts, storage),
        description=f"Report of {spec.registered_model}: table, charts, registration",
    )
    return {
        "best": winner,
        "family_best": {name: p["label"] for name, p in family_best.items()},
        "grid": grid,
        "comparison": comparison,
        "compression": compression,
        "registration": registration,
        "charts": charts,
        "seconds": time.perf_counter() - started,
    }


def _run_gpu_part(name: str, spec: MergeSpec) -> None:
    """Run the GPU part (factors, data-aware merges, index) as deployment ``name`` (on the
    GPU pool) and wait for it."""
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters={"spec": spec.model_dump(mode="json")}, as_subflow=True)
    if not run.state.is_completed():
        raise RuntimeError(f"GPU deployment {name} ended {run.state.name}: {run.state.message}")


def _report_folder(cache_dir: str | None, key: str) -> str:
    run = str(flow_run.id) if flow_run.id else time.strftime("%Y%m%d-%H%M%S")
    return str(CheckpointCache(cache_dir).root / "reports" / key / run)


def _report_markdown(
    spec: MergeSpec,
    winner: dict,
    registration: dict,
    comparison: dict,
    charts: dict[str, str],
    storage: str,
) -> str:
    tasks = [t.name for t in spec.tasks]
    lines = [
        f"# {spec.registered_model}",
        "",
        f"**Version {registration['version']}** ({', '.join(registration['aliases'])}"
        + (", already registered: no new version" if registration.get("reused") else "")
        + f"): {winner['label']}, report mean accuracy "
        f"{comparison[winner['label']]['mean_accuracy']:.4f}{storage}",
        "",
        "| model | kind | " + " | ".join(tasks) + " | mean |",
        "|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for name, summary in sorted(comparison.items(), key=lambda kv: -kv[1]["mean_accuracy"]):
        cells = [f"{100 * summary['accuracy'][t]:.1f}" for t in tasks]
        lines.append(
            f"| {name} | {summary['kind']} | "
            + " | ".join(cells)
            + f" | {100 * summary['mean_accuracy']:.1f} |"
        )
    lines += ["", "Charts, logged to MLflow with the run:", ""]
    base = registration.get("artifact_uri", "")
    for artifact_path in charts:
        link = f"{base}/{artifact_path}" if base else artifact_path
        lines.append(f"- [{Path(artifact_path).stem.replace('_', ' ')}]({link})")
    if registration.get("run_url"):
        lines += ["", f"MLflow run: {registration['run_url']}"]
    return "\n".join(lines)


def run_from_cli(spec_path: str, cache_dir: str | None = None, dask: str | None = None) -> dict:
    """Entry point for ``mergeflow run``: validate the spec file, then run the flow (on Dask
    when ``dask`` is given: ``"local"`` or a scheduler address)."""
    spec = MergeSpec.from_yaml(spec_path)
    if dask:
        from flows.dask_pipeline import on_dask

        return on_dask(None if dask == "local" else dask)(spec, cache_dir)
    return merge_pipeline(spec, cache_dir)
