"""Flows for deployments: the pipeline on a schedule (its spec read at run time from a file,
an s3:// URI or a Prefect variable) and the GPU part of the pipeline on its own pool.
"""

from __future__ import annotations

import yaml
from prefect import flow, get_run_logger

from flows.merge_pipeline import data_aware_candidates, merge_pipeline
from mergeflow.errors import ParameterError
from mergeflow.spec import MergeSpec
from mergeflow.storage import filesystem
from tasks.pipeline import compress_checkpoints, factorize_checkpoints, merge_with_data

SPEC_VARIABLE = "mergeflow-nightly-spec"


def load_spec(spec_uri: str | None, spec_variable: str | None) -> MergeSpec:
    """The spec in the YAML file at ``spec_uri`` (a path or any fsspec URI), or in the
    Prefect variable ``spec_variable`` (a YAML string or a JSON object)."""
    if (spec_uri is None) == (spec_variable is None):
        raise ParameterError("give exactly one of spec_uri and spec_variable")
    if spec_uri is not None:
        fs, path = filesystem(spec_uri)
        try:
            with fs.open(path, "r") as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise ParameterError(f"{spec_uri}: no such spec file") from None
        return MergeSpec.parse(data, source=spec_uri)
    from prefect.variables import Variable

    value = Variable.get(spec_variable)
    if value is None:
        raise ParameterError(f"Prefect variable {spec_variable!r} is not set")
    data = yaml.safe_load(value) if isinstance(value, str) else value
    return MergeSpec.parse(data, source=f"variable {spec_variable}")


@flow(name="scheduled-merge-pipeline", log_prints=True)
def scheduled_merge_pipeline(
    spec_uri: str | None = None,
    spec_variable: str | None = SPEC_VARIABLE,
    cache_dir: str | None = None,
) -> dict:
    """Read the spec now (so a schedule always runs the latest one), then run the pipeline.

    Args:
        spec_uri: a YAML spec file, a path or an s3:// URI (instead of the variable).
        spec_variable: the Prefect variable holding the spec, YAML or JSON.
        cache_dir: local cache folder.
    """
    spec = load_spec(spec_uri, None if spec_uri else spec_variable)
    get_run_logger().info("spec %s (sha256 %s)", spec.registered_model, spec.digest()[:12])
    return merge_pipeline(spec, cache_dir)


@flow(name="factorize-on-gpu", log_prints=True)
def factorize_on_gpu(
    spec: MergeSpec,
    cache_dir: str | None = None,
) -> dict:
    """The pipeline's GPU part (CART factors, the data-aware merges, and the CART index if
    the spec asks for one), written to the shared result store where the pipeline's own
    steps then find them.

    Args:
        spec: the spec whose checkpoints to factorize.
        cache_dir: local cache folder.
    """
    factors = factorize_checkpoints(spec, cache_dir)
    adapted = [merge_with_data(spec, c, cache_dir) for c in data_aware_candidates(spec)]
    index = compress_checkpoints(spec, cache_dir) if spec.compression else None
    return {"factors": factors, "adapted": adapted, "index": index["path"] if index else None}
