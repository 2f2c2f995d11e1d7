"""Tasks that move checkpoints: they retry, because object stores and networks fail. The
retry conditions here are the only ones the tasks use: I/O is retried, the math never."""

from __future__ import annotations

from prefect import task

from mergeflow.errors import CheckpointError
from mergeflow.sources import resolve_checkpoint
from mergeflow.storage import CheckpointCache


def retry_on_transient_io(task, task_run, state) -> bool:
    """Retry dropped connections and truncated downloads, not missing or corrupt files."""
    exc = state.data
    return isinstance(exc, CheckpointError) and exc.transient


def retry_on_connection_error(task, task_run, state) -> bool:
    """Retry what failed on the network (the tracking server, the object store), never an
    error in the data or the math."""
    exc = state.data
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(
        mark in text
        for mark in ("Connection", "Max retries exceeded", "Timeout", "503", "502", "504")
    )


# registry and tracking-server calls: twice more, on connection errors only
RETRY_ON_SERVER_ERRORS = {
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_on_connection_error,
}


@task(
    name="fetch checkpoint",
    task_run_name="fetch {uri}",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_on_transient_io,
)
def fetch_checkpoint(uri: str, cache_dir: str | None = None) -> dict:
    """Fetch every file of the checkpoint at ``uri`` (a file, a model folder, an ``hf://``
    reference) into the local cache; returns its kind, weights file and digest (small
    data)."""
    cache = CheckpointCache(cache_dir)
    source = resolve_checkpoint(uri, cache)
    copies = source.weight_files(cache)
    return {
        "uri": uri,
        "kind": source.kind,
        "path": str(copies[-1].path),
        "sha256": source.digest(cache),
        "etag": copies[-1].etag,
    }
