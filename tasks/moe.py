"""The Prefect task of MC-SMoE's expert merge (``mergeflow.moe``)."""

from __future__ import annotations

from prefect import get_run_logger, task

from mergeflow.moe import MoeMergeSpec, moe_merge


@task(name="merge experts", task_run_name="merge the experts of {spec.model}", tags=["gpu"])
def merge_experts(spec: MoeMergeSpec) -> dict:
    """Routing statistics on the calibration samples, the experts grouped and merged, the
    smaller MoE written to ``spec.out``; returns the report (groups, usage, agreement)."""
    return moe_merge(spec, say=get_run_logger().info)
