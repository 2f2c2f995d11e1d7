"""The merge pipeline: fetch → (align) → check → prepare → factorize → score the grid →
select → report → register.

mergeflow run SPEC.yaml [--dask [ADDRESS]]   (or deploy it: prefect.yaml)

What to score comes from :func:`mergeflow.plan.make_plan` (typed candidates), the choice
from :func:`mergeflow.selection.select`, the tables from :mod:`mergeflow.report`; this module
only orders the steps and fans the scoring out over the flow's task runner (threads by
default, a Dask cluster with ``flows.dask_pipeline``). Every costly step is kept by content
in the result store (``$MERGEFLOW_RESULT_STORE``), so a re-run of a spec recomputes nothing
and a killed run resumes.
"""

from __future__ import annotations

import time

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

from flows.console import PROGRESS_LINE, grid_bar, quiet_console, quiet_servers
from mergeflow import report, results, stores
from mergeflow.candidates import DataAware, reference
from mergeflow.checks import describe_distances
from mergeflow.evaluation import REPORT, SELECTION
from mergeflow.plan import Plan, make_plan
from mergeflow.run import RunInputs, combine_digests
from mergeflow.selection import GridPoint, Selection, scored_point
from mergeflow.spec import MergeSpec, SpecOverrides, resolve_spec
from mergeflow.storage import CheckpointCache
from tasks.checkpoints import fetch_checkpoint
from tasks.pipeline import (
    adapt,
    align_checkpoints,
    check_bases,
    compress,
    draw_charts,
    factorize,
    prepare_evaluation,
    read_adaptation,
    register_index,
    register_routed,
    register_winner,
    score,
    score_index,
    select_winner,
)


@flow(name="merge-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=4))
def merge_pipeline(
    spec: MergeSpec | None = None,
    spec_uri: str | None = None,
    overrides: SpecOverrides | None = None,
    cache_dir: str | None = None,
    gpu_deployment: str | None = None,
) -> dict:
    """Merge the spec's fine-tuned checkpoints with CART over its rank grid (and any other
    method families it lists), score every point on each task's selection split, compare
    each family's best with the baselines on the report split, and register the best.

    Args:
        spec: what to merge (base and fine-tuned checkpoints, each task's dataset), the grid
            to search, the baselines to compare with, and the registered model's name.
        spec_uri: instead of spec, a stored YAML spec: a path or an s3:// URI.
        overrides: changes to the spec for this run (grid, baselines, registered model).
        cache_dir: local cache folder for fetched files and prepared images (default:
            $MERGEFLOW_CACHE_DIR, else ~/.cache/mergeflow).
        gpu_deployment: run the GPU steps (factors, data-aware merges, index) as this
            deployment (on the GPU pool) first; the pipeline then finds their results in the
            shared result store.
    """
    logger, started, usage = get_run_logger(), time.perf_counter(), results.USAGE.mark()
    spec = resolve_spec(spec, spec_uri, overrides)
    where = stores.use_defaults(cache_dir)
    logger.info(where.line())
    inputs, lineage = fetch_inputs(spec, cache_dir)
    if spec.align is not None:
        inputs = align_checkpoints(inputs)
    distances = check_bases(inputs)
    if distances:
        logger.info("check: distance from the base: %s", describe_distances(distances))
    sizes = prepare_evaluation(inputs)
    logger.info("prepare: %s", report.splits_line(sizes))
    plan = make_plan(spec)
    for note in plan.notes:
        logger.warning(note)
    if gpu_deployment:
        run_gpu_steps(gpu_deployment, spec)
    logger.info("factorize: CART's factors in %s", factorize(inputs))
    # the data-aware merges start now, beside the grid; what scores them waits for them
    adapted = [adapt.submit(inputs, c) for c in plan.data_aware]
    finetuned = score(inputs, reference("finetuned"), SELECTION)
    points = score_grid(inputs, plan, finetuned, adapted)
    selection = select_winner(inputs, points, finetuned)
    winner = selection.winner.candidate
    log_selection(selection)

    comparison, compression = score_report(inputs, plan, selection, adapted, sizes)
    logger.info("report: %d models scored on the report splits", len(comparison))

    grid = [p.record() for p in points]
    charts = draw_charts(spec.registered_model, grid, comparison, report_folder(cache_dir, spec))
    registration = register_winner(inputs, winner, grid, comparison, lineage, charts)
    if compression is not None and spec.compression.register_model:
        compression["registration"] = register_index(
            inputs, compression, comparison[compression["label"]], lineage
        )
    routed = register_best_routed(inputs, plan, comparison, lineage)
    publish(spec, points, comparison, winner.label, registration, charts, compression)
    logger.info("register: %s", report.registration_line(registration))
    return {
        "best": winner.record(),
        "selection": selection.record(),
        "family_best": {name: p.candidate.label for name, p in selection.family_best.items()},
        "grid": grid,
        "comparison": comparison,
        "compression": compression,
        "registration": registration,
        "routed": routed,
        "charts": charts,
        "stores": where.record(),
        "store_usage": results.USAGE.since(usage),
        "seconds": time.perf_counter() - started,
    }


def fetch_inputs(spec: MergeSpec, cache_dir: str | None) -> tuple[RunInputs, dict[str, str]]:
    """Fetch every checkpoint (each with its retries) and resolve their digests once; the
    registry's lineage tags: where each came from, its digest, the Prefect run."""
    uris = [spec.base] + [t.checkpoint for t in spec.tasks]
    fetched = [f.result() for f in [fetch_checkpoint.submit(uri, cache_dir) for uri in uris]]
    digests = combine_digests(spec, {f["uri"]: (f["kind"], f["sha256"]) for f in fetched})
    roles = {spec.base: "base", **{t.checkpoint: t.name for t in spec.tasks}}
    lineage = {}
    for info in fetched:
        lineage[f"source.{roles[info['uri']]}.uri"] = info["uri"]
        lineage[f"source.{roles[info['uri']]}.sha256"] = info["sha256"]
    if flow_run.id:
        lineage["prefect.flow_run_id"] = str(flow_run.id)
    if deployment.id:
        lineage["prefect.deployment"] = f"{flow_run.flow_name}/{deployment.name}"
    get_run_logger().info("fetch: the base and %d fine-tuned checkpoints", len(spec.tasks))
    return RunInputs(spec=spec, digests=digests, cache_dir=cache_dir), lineage


def score_grid(inputs: RunInputs, plan: Plan, finetuned: dict, adapted: list) -> list[GridPoint]:
    """Every grid point on the selection splits, fanned out, with a progress artifact."""
    key = report.artifact_key(inputs.spec.registered_model)
    grid = plan.grid
    progress = create_progress_artifact(
        progress=0.0,
        key=f"{key}-progress",
        description=f"Grid of {inputs.spec.registered_model} on selection splits",
    )
    futures = {}
    for i, (_, candidate) in enumerate(grid):
        waits = adapted if isinstance(candidate, DataAware) else None
        futures[score.submit(inputs, candidate, SELECTION, wait_for=waits)] = i
    points: dict[int, GridPoint] = {}
    logger = get_run_logger()
    with grid_bar(len(grid)) as bar:
        for done, future in enumerate(as_completed(list(futures)), start=1):
            i = futures[future]
            family, candidate = grid[i]
            point = points[i] = scored_point(family, candidate, future.result(), finetuned)
            update_progress_artifact(progress, 100.0 * done / len(grid))
            bar.update()
            logger.info(
                f"grid {done}/{len(grid)}: {candidate.label} mean acc "
                f"{point.summary['mean_accuracy']:.3f} normalized {point.mean_normalized:.3f}",
                extra={PROGRESS_LINE: True},
            )
    return [points[i] for i in range(len(grid))]


def register_best_routed(inputs: RunInputs, plan: Plan, comparison: dict, lineage: dict):
    """Register the best routed model (Twin-Merging) as NAME-routed: its label and
    registration, or None when the spec lists none."""
    routed = plan.best_routed(comparison)
    if routed is None:
        return None
    registration = register_routed(inputs, routed, comparison[routed.label], lineage)
    return {"label": routed.label, "registration": registration}


def log_selection(selection: Selection) -> None:
    """The choice and why; what to check (warnings); the other families at a grid's edge."""
    logger = get_run_logger()
    logger.info("select: %s", selection.why())
    for warning in selection.warnings():
        logger.warning("select: %s", warning)
    if selection.other_edges():
        logger.info("select: other families at an edge: %s", "; ".join(selection.other_edges()))


def score_report(
    inputs: RunInputs, plan: Plan, selection: Selection, adapted: list, sizes: dict
) -> tuple[dict[str, dict], dict | None]:
    """Each family's best point, the baselines, the references (and the CART index, when
    the spec asks for one) on the report splits (``sizes``: task → split → images): the
    comparison by kind, with intervals, and the index's path, label and size."""
    candidates = plan.report_candidates([p.candidate for p in selection.family_best.values()])
    scores = score_each(inputs, candidates, adapted)
    kinds = {label: c.report_kind for label, c in candidates.items()}
    compression = compress(inputs) if inputs.spec.compression is not None else None
    if compression is not None:
        scores[compression["label"]] = score_index(inputs, compression["path"], REPORT)
        kinds[compression["label"]] = "per-task"  # one model per task: compression
    adaptations = {
        label: read_adaptation(inputs, c)
        for label, c in candidates.items()
        if isinstance(c, DataAware)
    }
    report_sizes = {task: per_split[REPORT] for task, per_split in sizes.items()}
    return report.compare(kinds, scores, adaptations, report_sizes), compression


def score_each(inputs: RunInputs, candidates: dict, adapted: list) -> dict[str, dict]:
    """Each candidate (label → candidate) on the report splits, fanned out."""
    pending = {
        label: score.submit(
            inputs, c, REPORT, wait_for=adapted if isinstance(c, DataAware) else None
        )
        for label, c in candidates.items()
    }
    return {label: future.result() for label, future in pending.items()}


def publish(spec, points, comparison, winner, registration, charts, compression) -> None:
    """The run's Prefect artifacts: the grid and comparison tables, the markdown report."""
    key = report.artifact_key(spec.registered_model)
    create_table_artifact(
        key=f"{key}-grid",
        table=report.grid_rows(points),
        description=f"Grid on the selection splits of {spec.registered_model}",
    )
    create_table_artifact(
        key=f"{key}-comparison",
        table=report.comparison_rows(comparison),
        description="Report-split accuracy per task and method",
    )
    tasks = [t.name for t in spec.tasks]
    lines = [report.storage_line(compression, len(tasks))]
    lines += [f"Routed: {line}" for line in report.routed_lines(comparison)]
    storage = "\n\n".join(line for line in lines if line)
    create_markdown_artifact(
        key=f"{key}-report",
        markdown=report.markdown(
            spec.registered_model, tasks, winner, registration, comparison, charts, storage
        ),
        description=f"Report of {spec.registered_model}: table, charts, registration",
    )


def run_gpu_steps(name: str, spec: MergeSpec) -> None:
    """Run the GPU steps (factors, data-aware merges, index) as deployment ``name`` (on the
    GPU pool) and wait for it."""
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters={"spec": spec.model_dump(mode="json")}, as_subflow=True)
    if not run.state.is_completed():
        raise RuntimeError(f"GPU deployment {name} ended {run.state.name}: {run.state.message}")


def report_folder(cache_dir: str | None, spec: MergeSpec) -> str:
    run = str(flow_run.id) if flow_run.id else time.strftime("%Y%m%d-%H%M%S")
    key = report.artifact_key(spec.registered_model)
    return str(CheckpointCache(cache_dir).root / "reports" / key / run)


def run_from_cli(spec_path: str, cache_dir: str | None = None, dask: str | None = None) -> dict:
    """Entry point for ``mergeflow run``: validate the spec file, then run the flow (on Dask
    when ``dask`` is given: ``"local"`` or a scheduler address)."""
    spec = MergeSpec.from_yaml(spec_path)
    quiet_servers()
    quiet_console()
    if dask:
        from flows.dask_pipeline import on_dask

        return on_dask(None if dask == "local" else dask)(spec, cache_dir=cache_dir)
    return merge_pipeline(spec, cache_dir=cache_dir)
