"""Tasks that run the merge math: no retries, a failed SVD is not an I/O hiccup."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task

from mergeflow.merge import merge_files
from mergeflow.storage import CheckpointCache


@task(name="merge checkpoints", task_run_name="merge {method} into {out}", tags=["gpu"])
def merge_checkpoints(
    method: str,
    base: str,
    finetuned: list[str],
    params: dict,
    out: str,
    device: str = "auto",
    cache_dir: str | None = None,
) -> dict:
    """Merge the checkpoints at these URIs (read through the cache) and write ``out``."""
    report = merge_files(
        method, base, finetuned, params, out, device=device, cache=CheckpointCache(cache_dir)
    )
    return asdict(report)
