"""Merging as checkpoints arrive: list → fetch → take in what is new → score → register.

mergeflow arrivals SPEC.yaml   (or deploy it: prefect.yaml's merge-arrivals, on a schedule
and on the event ``mergeflow.checkpoint.landed``)

Each run lists the spec's prefix, fetches what has landed, and takes in the checkpoints the
stream has not (by content digest): ``mode: continual`` folds each into the running state
in landing order (:mod:`mergeflow.arrivals`), ``mode: full`` merges everything again. The
merge is scored on every task seen so far and registered as ``challenger``, with the
arrival history in its tags; ``champion`` moves only through the usual gate. A run with
nothing new does nothing; a run that dies part-way resumes where it stopped.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.merge_pipeline import fetch_inputs
from mergeflow.arrivals import ArrivalsSpec, StreamHead, next_arrivals, state_key
from mergeflow.candidates import Continual, FixedMethod
from mergeflow.continual import Arrival
from mergeflow.errors import ParameterError
from mergeflow.evaluation import REPORT
from mergeflow.run import weights_digest
from tasks.arrivals import (
    fold_arrival,
    list_landed,
    read_head,
    register_arrivals,
    write_head,
)
from tasks.checkpoints import fetch_checkpoint
from tasks.pipeline import score

SPEC_VARIABLE = "mergeflow-arrivals-spec"


@flow(name="merge-arrivals", log_prints=True)
def merge_arrivals(
    spec: ArrivalsSpec | None = None,
    spec_uri: str | None = None,
    spec_variable: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Take in the fine-tuned checkpoints that have landed under the spec's prefix since
    the last run, score the merge on every task seen so far and register it.

    Args:
        spec: the stream: prefix, base, tasks with their datasets, method and mode.
        spec_uri: instead of spec, a stored YAML spec (a path or an s3:// URI), read now.
        spec_variable: instead of spec, the Prefect variable holding it (YAML or JSON).
        cache_dir: local cache folder (default: $MERGEFLOW_CACHE_DIR, else ~/.cache/mergeflow).
    """
    logger = get_run_logger()
    spec = resolve_arrivals_spec(spec, spec_uri, spec_variable)
    landed, strangers = list_landed(spec)
    for uri in strangers:
        logger.warning("%s names no task of the spec: left alone", uri)
    base = fetch_checkpoint(spec.base, cache_dir)
    fetched = [f.result() for f in [fetch_checkpoint.submit(c.uri, cache_dir) for c in landed]]
    found = [
        Arrival(
            uri=c.uri, sha256=weights_digest(f["kind"], f["sha256"], base["sha256"]), task=c.task
        )  # fmt: skip
        for c, f in zip(landed, fetched, strict=True)
    ]
    head = read_head(spec, base["sha256"], cache_dir)
    new = next_arrivals(head, found)
    if not new:
        logger.info("nothing new under %s: %d checkpoint(s) taken in already",
                    spec.prefix, len(head.arrivals))  # fmt: skip
        return {"new": [], "taken_in": [a.task for a in head.arrivals], "version": head.version}
    history = [*head.arrivals, *new]
    logger.info("new under %s: %s", spec.prefix, ", ".join(a.task for a in new))
    base_arrival = Arrival(uri=spec.base, sha256=base["sha256"])
    state = None
    if spec.mode == "continual":
        for i in range(len(head.arrivals), len(history)):
            record = fold_arrival(spec, base_arrival, history[:i], history[i], cache_dir)
            logger.info("fold: %s in (%d of %d), scale %.4f", history[i].task, i + 1,
                        len(history), record.scale)  # fmt: skip
        state = state_key(spec, base["sha256"], history)
    if len(history) < 2:
        write_head(spec, base["sha256"], StreamHead(arrivals=history, state_key=state), cache_dir)
        logger.info("one task taken in: a merged model needs a second; nothing registered yet")
        return {"new": [a.task for a in new], "taken_in": [a.task for a in history],
                "version": None}  # fmt: skip
    inputs, lineage = fetch_inputs(spec.merge_spec(history), cache_dir)
    label = f"{spec.method} after {len(history)} arrivals"
    if state is not None:
        candidate = Continual(label=label, name=spec.method, params=spec.params, state_key=state)
    else:
        candidate = FixedMethod(label=label, name=spec.method, params=spec.params)
    scores = score(inputs, candidate, REPORT)
    registration = register_arrivals(inputs, candidate, scores, history, lineage)
    write_head(spec, base["sha256"], StreamHead(arrivals=history, state_key=state,
               version=str(registration["version"])), cache_dir)  # fmt: skip
    create_markdown_artifact(
        key=f"arrivals-{spec.registered_model.lower().replace('_', '-')}",
        markdown=arrivals_table(spec, history, scores, registration),
        description=f"{spec.registered_model}: what the stream has taken in",
    )
    return {
        "new": [a.task for a in new],
        "taken_in": [a.task for a in history],
        "scores": scores,
        "version": registration["version"],
        "registration": registration,
    }


def run_from_cli(spec_path: str, cache_dir: str | None = None) -> dict:
    """Entry point for ``mergeflow arrivals``."""
    from flows.console import quiet_console, quiet_servers

    spec = ArrivalsSpec.load(spec_path)
    quiet_servers()
    quiet_console()
    return merge_arrivals(spec, cache_dir=cache_dir)


def resolve_arrivals_spec(
    spec: ArrivalsSpec | None, spec_uri: str | None, spec_variable: str | None
) -> ArrivalsSpec:
    """The spec given, or read now from ``spec_uri`` or the Prefect variable."""
    given = [x is not None for x in (spec, spec_uri, spec_variable)]
    if sum(given) != 1:
        raise ParameterError("give exactly one of spec, spec_uri and spec_variable")
    if spec is not None:
        return spec
    if spec_uri is not None:
        return ArrivalsSpec.load(spec_uri)
    from flows.scheduled import spec_from_variable

    return spec_from_variable(spec_variable, ArrivalsSpec.load, ArrivalsSpec.parse)


def arrivals_table(spec, history: list[Arrival], scores: dict, registration: dict) -> str:
    rows = [f"| {i + 1} | {a.task} | `{a.sha256[:12]}` | {scores.get(a.task, float('nan')):.4f} |"
            for i, a in enumerate(history)]  # fmt: skip
    aliases = ", ".join(registration.get("aliases", [])) or "none"
    return "\n".join(
        [
            f"## {spec.registered_model}: {spec.mode} {spec.method}",
            "",
            "| # | task | sha256 | accuracy (report split) |",
            "|---:|---|---|---:|",
            *rows,
            "",
            f"Registered as version {registration['version']} (aliases: {aliases}).",
        ]
    )
