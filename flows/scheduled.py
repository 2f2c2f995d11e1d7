"""Flows for deployments: the pipeline on a schedule (its spec read at run time from a file,
an s3:// URI or a Prefect variable) and the GPU steps of the pipeline on their own pool.
"""

from __future__ import annotations

import yaml
from prefect import flow, get_run_logger

from flows.merge_pipeline import merge_pipeline
from mergeflow.errors import ParameterError
from mergeflow.plan import make_plan
from mergeflow.spec import MergeSpec, load_spec
from tasks.pipeline import adapt, compress, factorize, resolve_inputs

SPEC_VARIABLE = "mergeflow-nightly-spec"


def spec_from_variable(name: str, load=load_spec, parse=MergeSpec.parse):
    """The spec held in the Prefect variable ``name``: YAML text, a JSON object, or (for a
    spec larger than a variable holds) ``spec_uri: URI`` naming where it is stored, read
    by ``load(uri)``; ``parse(data, source)`` validates the others (a merge spec unless
    told otherwise)."""
    from prefect.variables import Variable

    value = Variable.get(name)
    if value is None:
        raise ParameterError(f"Prefect variable {name!r} is not set")
    data = yaml.safe_load(value) if isinstance(value, str) else value
    if isinstance(data, dict) and set(data) == {"spec_uri"}:
        return load(data["spec_uri"])
    return parse(data, f"variable {name}")


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
    if spec_uri is None and spec_variable is None:
        raise ParameterError("give spec_uri or spec_variable")
    spec = load_spec(spec_uri) if spec_uri else spec_from_variable(spec_variable)
    get_run_logger().info("spec %s (sha256 %s)", spec.registered_model, spec.digest()[:12])
    return merge_pipeline(spec, cache_dir=cache_dir)


@flow(name="gpu-steps", log_prints=True)
def gpu_steps(spec: MergeSpec, cache_dir: str | None = None) -> dict:
    """The pipeline's steps that want a GPU: the CART factors, the data-aware merges, and
    the CART index if the spec asks for one, written to the shared result store where the
    pipeline's own steps then find them.

    Args:
        spec: the spec whose checkpoints to factorize and adapt.
        cache_dir: local cache folder.
    """
    inputs = resolve_inputs(spec, cache_dir)
    factors = factorize(inputs)
    adapted = [adapt(inputs, c) for c in make_plan(spec).data_aware]
    index = compress(inputs) if spec.compression else None
    return {"factors": factors, "adapted": adapted, "index": index["path"] if index else None}
