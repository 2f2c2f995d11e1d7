"""MC-SMoE's merge stage as a Prefect flow: fewer experts in one mixture-of-experts model.

Deployed on demand from ``prefect.yaml`` (``merge-moe``); ``mergeflow moe-merge`` runs the
same from a shell.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from mergeflow.moe import MoeMergeSpec
from mergeflow.report import artifact_key
from tasks.moe import merge_experts


@flow(name="merge-moe", log_prints=True)
def merge_moe(spec: MoeMergeSpec) -> dict:
    """Merge the experts of the MoE at ``spec.model`` into ``spec.experts`` per layer,
    guided by its routing on ``spec.calibration``, and write the smaller model to
    ``spec.out``; a table artifact lists each layer's groups and routing agreement."""
    report = merge_experts(spec)
    create_table_artifact(
        key=f"moe-{artifact_key(spec.out)}"[:100].rstrip("-"),
        table=[
            {
                "layer": i,
                "groups": " ".join("+".join(map(str, g)) for g in layer["groups"]),
                "routing_agreement": layer["routing_agreement"],
            }
            for i, layer in enumerate(report["layers"])
        ],
        description=f"Experts of {spec.model}: {report['experts_before']} → "
        f"{report['experts_after']} per layer",
    )
    return report
