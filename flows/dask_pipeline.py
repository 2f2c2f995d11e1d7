"""The merge pipeline with its scoring fanned out over a Dask cluster (prefect-dask).

Kept apart from ``flows.merge_pipeline`` so that importing the pipeline does not import
Dask; the deployment ``merge-pipeline-dask/dask`` points here.
"""

from __future__ import annotations

import os

from prefect_dask import DaskTaskRunner

from flows.merge_pipeline import merge_pipeline

DASK_ADDRESS_VARIABLE = "MERGEFLOW_DASK_ADDRESS"


def dask_task_runner(address: str | None = None) -> DaskTaskRunner:
    """A Dask task runner: the scheduler at ``address`` (or ``$MERGEFLOW_DASK_ADDRESS``), else
    a local cluster of worker processes with one torch thread each."""
    address = address or os.environ.get(DASK_ADDRESS_VARIABLE) or None
    if address:
        return DaskTaskRunner(address=address)
    workers = int(os.environ.get("MERGEFLOW_DASK_WORKERS", "2"))
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )


def on_dask(address: str | None = None):
    """The merge pipeline with its scoring fanned out over a Dask cluster."""
    return merge_pipeline.with_options(
        name="merge-pipeline-dask", task_runner=dask_task_runner(address)
    )


# the deployable form: the scheduler address comes from $MERGEFLOW_DASK_ADDRESS on the
# worker, else a local cluster is started
merge_pipeline_on_dask = on_dask()
