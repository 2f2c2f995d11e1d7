"""What of infra/ can be checked without Docker or a cluster: the compose file's wiring and
secrets, the worker image's inputs, prefect.yaml's deployments against the flows, and the
Kubernetes GPU job template (accepted by a real Prefect API, rendered the worker's way)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_stands_up_the_whole_stack(compose):
    services = compose["services"]
    assert {
        "prefect-server",
        "prefect-db",
        "mlflow",
        "mlflow-db",
        "minio",
        "buckets",
        "worker-cpu",
        "worker-gpu",
        "setup",
    } <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        build = service.get("build")
        if build:
            assert (INFRA / build["context"] / build["dockerfile"]).is_file(), name
    prefect = services["prefect-server"]["environment"]
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "--backend-store-uri=postgresql://" in " ".join(services["mlflow"]["command"])
    assert "--artifacts-destination=s3://mlflow-artifacts" in services["mlflow"]["command"]
    gpu = services["worker-gpu"]
    assert gpu["command"][-1] == "gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for worker in ("worker-cpu", "worker-gpu"):
        env = services[worker]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["MERGEFLOW_RESULT_STORE"].startswith("s3://")


def test_compose_holds_no_secret_and_requires_each_one(compose):
    text = (INFRA / "compose.yaml").read_text()
    for variable in ("PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "MINIO_ROOT_PASSWORD"):
        assert f"${{{variable}:?" in text, f"{variable} must be required, with no default"
    for service in compose["services"].values():
        env = service.get("environment", {})
        for key, value in env.items():
            if re.search("PASSWORD|SECRET", key):
                assert str(value).startswith("$"), f"{key} has a literal value"
    example = (INFRA / "stack.env.example").read_text()
    assert re.findall(r"^(\w*PASSWORD)=$", example, re.M)
    assert "infra/stack.env" in (ROOT / ".gitignore").read_text().split()


def test_worker_image_copies_what_the_deployments_run():
    dockerfile = (INFRA / "worker.Dockerfile").read_text()
    assert re.search(r"^ARG BASE=nvidia/cuda:", dockerfile, re.M)
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: no such file in the repository"
    assert "torch==2.14.1" in dockerfile
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    for deployment in deployments:
        module = deployment["entrypoint"].split(":")[0].split("/")[0]
        assert f"COPY {module} " in dockerfile, deployment["name"]


def test_every_deployment_points_at_a_flow():
    import importlib

    from prefect import Flow

    document = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = set()
    for deployment in document["deployments"]:
        path, attribute = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, attribute), Flow), deployment["entrypoint"]
        assert deployment["work_pool"]["name"] in ("cpu", "gpu")
        names.add(deployment["name"])
    assert {"on-demand", "nightly", "dask", "gpu", "promote", "merge-arrivals"} <= names


def test_the_arrivals_deployment_runs_on_a_schedule_and_on_the_landing_event():
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from prefect.events.schemas.events import Resource
    from pydantic import TypeAdapter

    from flows.arrivals import SPEC_VARIABLE, merge_arrivals

    document = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployment = next(d for d in document["deployments"] if d["name"] == "merge-arrivals")
    (trigger,) = TypeAdapter(list[DeploymentTriggerTypes]).validate_python(deployment["triggers"])
    assert trigger.expect == {"mergeflow.checkpoint.landed"}
    landed = Resource({"prefect.resource.id": "mergeflow.arrivals.demo"})
    other = Resource({"prefect.resource.id": "prefect.flow-run.1234"})
    assert trigger.match.includes([landed]) and not trigger.match.includes([other])
    assert deployment["parameters"] == {"spec_variable": SPEC_VARIABLE}
    assert set(deployment["parameters"]) <= set(merge_arrivals.parameters.properties)
    assert deployment["schedules"][0]["interval"] == 3600 and deployment["concurrency_limit"] == 1


def test_kubernetes_gpu_template_is_accepted_and_renders_a_gpu_job(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import apply_values

    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    with get_client(sync_client=True) as client:
        # the server checks that every placeholder has a variable
        client.create_work_pool(
            WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=template),
            overwrite=True,
        )
        stored = client.read_work_pool("gpu-k8s").base_job_template
        # ... and refuses one that is not (so the acceptance above means something)
        broken = json.loads(json.dumps(template))
        broken["job_configuration"]["job_manifest"]["spec"]["x"] = "{{ no_such_variable }}"
        with pytest.raises(Exception, match="422"):
            client.create_work_pool(
                WorkPoolCreate(name="gpu-k8s-broken", type="kubernetes", base_job_template=broken)
            )
    assert stored == template

    variables = template["variables"]["properties"]
    values = {name: spec["default"] for name, spec in variables.items() if "default" in spec}
    values.update({"gpus": 2, "command": ["prefect", "flow-run", "execute"]})
    rendered = apply_values(template["job_configuration"], values)
    job = rendered["job_manifest"]
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    assert "{{" not in json.dumps(job)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["args"] == ["prefect", "flow-run", "execute"]
    # credentials come from a Kubernetes secret, not from the template's values
    assert container["envFrom"][0]["secretRef"]["name"] == "mergeflow-credentials"
    assert not any(re.search("KEY|SECRET|PASSWORD", k) for k in container["env"])
