"""Tasks that move checkpoints: they retry, because object stores and networks fail."""

from __future__ import annotations

from prefect import task

from mergeflow.errors import CheckpointError
from mergeflow.storage import CheckpointCache


def retry_on_transient_io(task, task_run, state) -> bool:
    """Retry dropped connections and truncated downloads, not missing or corrupt files."""
    exc = state.data
    return isinstance(exc, CheckpointError) and exc.transient


@task(
    name="fetch checkpoint",
    task_run_name="fetch {uri}",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=retry_on_transient_io,
)
def fetch_checkpoint(uri: str, cache_dir: str | None = None) -> dict:
    """Fetch ``uri`` into the local cache; returns its local path and digests (small data)."""
    copy = CheckpointCache(cache_dir).fetch(uri)
    return {"uri": uri, "path": str(copy.path), "sha256": copy.digest(), "etag": copy.etag}
