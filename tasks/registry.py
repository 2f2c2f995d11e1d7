"""Tasks that read and move MLflow registry aliases: they retry, the registry is a server."""

from __future__ import annotations

from prefect import task

from mergeflow import registry
from tasks.checkpoints import RETRY_ON_SERVER_ERRORS


@task(
    name="resolve version",
    task_run_name="resolve {name}@{reference}",
    **RETRY_ON_SERVER_ERRORS,
)
def resolve_version(name: str, reference: str, missing_ok: bool = False) -> str | None:
    """The version number an alias (or a number) of ``name`` names."""
    return registry.resolve_version(name, reference, missing_ok=missing_ok)


@task(
    name="move champion",
    task_run_name="consider {name} version {version} for champion",
    **RETRY_ON_SERVER_ERRORS,
)
def move_champion(name: str, version: str, score: float, champion_score: float) -> bool:
    import mlflow

    return registry.promote(mlflow.MlflowClient(), name, version, score, champion_score)
