"""Create mergeflow's work pools, concurrency limits and variables on a Prefect server, then
deploy every flow of ../prefect.yaml. Safe to run again: what exists is updated.

    PREFECT_API_URL=http://prefect.internal:4200/api python infra/setup_prefect.py --gpus 2

- work pool ``cpu`` (process): the pipeline, the promotion flow, single merges;
- work pool ``gpu`` (process, or with ``--kubernetes-template infra/k8s/gpu-job-template.json``
  a Kubernetes pool whose jobs request GPUs) limited to ``--gpus`` concurrent flow runs: the
  pipeline's GPU part on its own;
- tag concurrency limit ``gpu`` = ``--gpus``: tasks tagged ``gpu`` (SVD factorization, CART
  index, merges) run at most one per GPU, whichever pool's worker runs them;
- variable ``mergeflow-nightly-spec`` from ``--nightly-spec FILE`` (the scheduled run reads
  it at run time), when given. A spec longer than a Prefect variable holds (5,000
  characters) is stored as an object under ``--spec-store`` (default
  ``$MERGEFLOW_RESULT_STORE``), at ``specs/SHA256.yaml``, and the variable names it;
- variable ``mergeflow-arrivals-spec`` from ``--arrivals-spec FILE`` the same way (what the
  ``merge-arrivals`` deployment takes in, hourly and on ``mergeflow.checkpoint.landed``).

Any failure ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_TAG = "gpu"


def ensure_pools(client, gpus: int, kubernetes_template: str | None = None) -> None:
    """Pools ``cpu`` (process) and ``gpu`` (process, or Kubernetes with the given base job
    template), the latter limited to one flow run per GPU."""
    import json

    from prefect.client.schemas.actions import WorkPoolCreate

    client.create_work_pool(
        WorkPoolCreate(name="cpu", type="process", description="mergeflow CPU work"),
        overwrite=True,
    )
    gpu = {
        "name": "gpu",
        "type": "process",
        "description": f"mergeflow GPU work: {gpus} GPU(s), one flow run each",
        "concurrency_limit": gpus,
    }
    if kubernetes_template:
        gpu["type"] = "kubernetes"
        gpu["base_job_template"] = json.loads(Path(kubernetes_template).read_text())
    client.create_work_pool(WorkPoolCreate(**gpu), overwrite=True)


def ensure_gpu_task_limit(client, gpus: int) -> None:
    """One task tagged ``gpu`` per GPU across all runs (a tag limit is replaced, not added)."""
    from prefect.exceptions import ObjectNotFound

    with contextlib.suppress(ObjectNotFound):
        client.delete_concurrency_limit_by_tag(GPU_TAG)
    client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=gpus)


# Prefect refuses variable values longer than this
VARIABLE_LIMIT = 5000


def set_nightly_spec(path: str, store: str | None) -> str:
    """Put the merge spec at ``path`` where the scheduled run reads it (see
    :func:`set_spec_variable`)."""
    from flows.scheduled import SPEC_VARIABLE
    from mergeflow.spec import MergeSpec

    MergeSpec.from_yaml(path)  # refuse a bad spec here, not at 2 a.m.
    return set_spec_variable(SPEC_VARIABLE, path, store)


def set_arrivals_spec(path: str, store: str | None) -> str:
    """Put the arrivals spec at ``path`` where the merge-arrivals runs read it."""
    from flows.arrivals import SPEC_VARIABLE
    from mergeflow.arrivals import ArrivalsSpec

    ArrivalsSpec.load(path)
    return set_spec_variable(SPEC_VARIABLE, path, store)


def set_spec_variable(variable: str, path: str, store: str | None) -> str:
    """The spec file at ``path`` in the Prefect variable ``variable``, or, when longer than
    a variable holds, as an object under ``store`` with the variable naming it. Returns
    where it went."""
    import hashlib

    import yaml
    from prefect.variables import Variable

    from mergeflow.errors import ParameterError
    from mergeflow.storage import filesystem

    text = Path(path).read_text()
    if len(text) <= VARIABLE_LIMIT:
        Variable.set(variable, text, overwrite=True)
        return f"variable {variable}"
    if not store:
        raise ParameterError(
            f"{path}: {len(text)} characters, more than a Prefect variable holds "
            f"({VARIABLE_LIMIT}): give --spec-store s3://BUCKET/PREFIX (or set "
            "MERGEFLOW_RESULT_STORE) to store it as an object the variable names"
        )
    uri = f"{store.rstrip('/')}/specs/{hashlib.sha256(text.encode()).hexdigest()}.yaml"
    fs, object_path = filesystem(uri)
    fs.makedirs(object_path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(object_path, "w") as f:
        f.write(text)
    Variable.set(variable, yaml.safe_dump({"spec_uri": uri}), overwrite=True)
    return f"{uri} (named by variable {variable})"


def deploy(names: list[str] | None) -> None:
    """``prefect deploy`` of prefect.yaml's deployments (all, or the named ones)."""
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
    command += [arg for name in names for arg in ("--name", name)] if names else ["--all"]
    env = {**os.environ, "MERGEFLOW_HOME": os.environ.get("MERGEFLOW_HOME", str(ROOT))}
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in the gpu pool (default 1)")
    parser.add_argument("--nightly-spec", help="YAML spec the scheduled deployment runs")
    parser.add_argument("--arrivals-spec", help="YAML arrivals spec merge-arrivals runs")
    parser.add_argument(
        "--spec-store",
        default=os.environ.get("MERGEFLOW_RESULT_STORE"),
        help="where a spec too long for a Prefect variable is stored "
        "(default: $MERGEFLOW_RESULT_STORE)",
    )
    parser.add_argument(
        "--deployment", action="append", help="deploy only this one (repeatable; default all)"
    )
    parser.add_argument("--no-deploy", action="store_true", help="pools and limits only")
    parser.add_argument(
        "--kubernetes-template",
        help="make the gpu pool a Kubernetes pool with this base job template "
        "(infra/k8s/gpu-job-template.json); its workers need prefect-kubernetes",
    )
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error("--gpus must be at least 1")
    if not os.environ.get("PREFECT_API_URL"):
        parser.error("set PREFECT_API_URL to the Prefect server's API, e.g. http://HOST:4200/api")
    sys.path.insert(0, str(ROOT))
    try:
        set_up(args)
    except subprocess.CalledProcessError as exc:
        print(
            f"setup_prefect: error: {' '.join(exc.cmd[2:])} failed (status {exc.returncode})",
            file=sys.stderr,
        )
        return 2
    except Exception as exc:  # one line for the operator; the cause is in the message
        message = " ".join(str(exc).split())
        print(f"setup_prefect: error: {type(exc).__name__}: {message}", file=sys.stderr)
        return 2
    return 0


def set_up(args: argparse.Namespace) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        ensure_pools(client, args.gpus, args.kubernetes_template)
        ensure_gpu_task_limit(client, args.gpus)
    if args.nightly_spec:
        print(f"nightly spec: {set_nightly_spec(args.nightly_spec, args.spec_store)}")
    if args.arrivals_spec:
        print(f"arrivals spec: {set_arrivals_spec(args.arrivals_spec, args.spec_store)}")
    if not args.no_deploy:
        deploy(args.deployment)
    api = os.environ["PREFECT_API_URL"]
    print(f"pools cpu and gpu, tag limit {GPU_TAG}={args.gpus} ready on {api}")


if __name__ == "__main__":
    sys.exit(main())
