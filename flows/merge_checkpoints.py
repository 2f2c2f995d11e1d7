"""One merge as a Prefect flow: fetch every checkpoint (with retries), merge, write.

Deployed on demand from ``prefect.yaml``; the merge pipeline with its rank grid, evaluation
and registry is a separate flow.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from pydantic import Field

from mergeflow.methods import get_method
from tasks.checkpoints import fetch_checkpoint
from tasks.merging import merge_checkpoints


@flow(name="merge-checkpoints", log_prints=True)
def merge_checkpoints_flow(
    method: Annotated[str, Field(description="merge method (see `mergeflow methods`)")],
    base: Annotated[str, Field(description="URI of the pre-trained checkpoint")],
    finetuned: Annotated[list[str], Field(description="URIs of the fine-tuned checkpoints")],
    out: Annotated[str, Field(description="URI to write the merged safetensors to")],
    params: Annotated[
        dict[str, float | str] | None, Field(description="method parameters, e.g. rank_ratio")
    ] = None,
    device: Annotated[str, Field(description="auto (CUDA when present), cpu or cuda")] = "auto",
    cache_dir: Annotated[str | None, Field(description="local cache for remote files")] = None,
) -> dict:
    """Merge fine-tuned checkpoints into one and write it as safetensors."""
    get_method(method).parse_params(params)  # fail before any download
    # Fetching first gives each download its retries and records the digests; the merge
    # then reads the same URIs from the cache (one metadata request each, no bytes).
    futures = [fetch_checkpoint.submit(uri, cache_dir) for uri in [base, *finetuned]]
    fetched = [future.result() for future in futures]
    report = merge_checkpoints(method, base, finetuned, params or {}, out, device, cache_dir)
    report["sources"] = {f["uri"]: f["sha256"] for f in fetched}
    print(f"wrote {out} ({report['num_tensors']} tensors, {report['seconds']:.1f} s)")
    return report
