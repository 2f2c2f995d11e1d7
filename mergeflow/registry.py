"""The MLflow model registry: merged models as pyfunc models that classify images.

A registered version holds the merged weights (safetensors), every task's frozen zero-shot
head and class names, and the open_clip config name. ``mlflow.pyfunc.load_model`` gives a
model whose ``predict`` takes a DataFrame with a ``task`` column and an ``image`` column
(PNG/JPEG bytes, or H×W(×C) uint8 arrays) and returns the predicted class per row.

Aliases, never stages: a new version gets ``challenger``; ``champion`` moves to it only
when its score beats the score of the version that holds ``champion`` now, taken on the same
report data (recorded in its tags, or rescored).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Logging or loading a model logged as code runs its file with sys.modules["dbutils"] swapped
# for a mock and put back afterwards, without a lock: two threads of one process doing it at
# once (the winner's and the index's registrations, a champion's rescoring) can leave the
# mock in sys.modules for good.
_LOADING_MODEL_CODE = threading.Lock()


def load_registered_model(model_uri: str):
    """The python model behind ``model_uri`` (``models:/NAME@champion``, ``runs:/...``)."""
    mlflow = _mlflow()
    with _LOADING_MODEL_CODE:
        return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()


CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_TAG = "mergeflow.score"
REPORT_DATA_TAG = "mergeflow.report_data"
# the registry's answers that mean "there is no such model, version or alias"; any other
# error (the server down, a timeout) is not an answer and is raised
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
REGISTRATION_KEY_TAG = "mergeflow.registration_key"
# MLflow "models from code": the model is this file, not a pickle, so loading runs no
# pickled code.
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def _mlflow():
    import mlflow

    return mlflow


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    run_id: str
    aliases: tuple[str, ...]
    previous_champion: str | None
    reused: bool = False


def current_champion(client, name: str):
    """The version holding ``champion``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND:
            return None
        raise


def resolve_version(name: str, reference: str, missing_ok: bool = False) -> str | None:
    """The version number that ``reference`` (an alias such as ``champion``, or a number)
    names in registered model ``name``; None when ``missing_ok`` and there is none."""
    from mlflow.exceptions import MlflowException

    client = _mlflow().MlflowClient()
    try:
        if reference.isdigit():
            return str(client.get_model_version(name, reference).version)
        return str(client.get_model_version_by_alias(name, reference).version)
    except MlflowException as exc:
        if exc.error_code not in NOT_FOUND:
            raise
        if missing_ok:
            return None
        raise LookupError(f"registered model {name!r} has no version {reference!r}") from exc


def find_version(client, name: str, registration_key: str):
    """The version of ``name`` registered under ``registration_key``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    for version in versions:
        if version.tags.get(REGISTRATION_KEY_TAG) == registration_key:
            return version
    return None


def reuse_version(
    client, name: str, registration_key: str, score: float, report_data: str, rescore=None
) -> Registration | None:
    """The registration of the version already made under ``registration_key`` (its aliases
    settled if the attempt that made it stopped before), or None when there is none."""
    existing = find_version(client, name, registration_key)
    if existing is None:
        return None
    log.info(
        "%s version %s already holds this model; not registering again", name, existing.version
    )
    aliases, previous = tuple(existing.aliases or ()), None
    if not aliases:
        aliases, previous = _move_aliases(client, name, existing, score, report_data, rescore)
    return Registration(name, str(existing.version), existing.run_id, aliases, previous, True)


def register_merged_model(
    name: str,
    model_config: str,
    weights: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] | None,
    heads: Mapping[str, torch.Tensor],
    classes: Mapping[str, tuple[str, ...]],
    score: float,
    params: Mapping[str, object],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    registration_key: str,
    report_data: str,
    rescore: Callable[[str], float] | None = None,
    run_id: str | None = None,
    index_path: str | None = None,
    artifacts: Mapping[str, str] | None = None,
    complement: Mapping[str, torch.Tensor] | None = None,
) -> Registration:
    """Log the merged model in a run (the active one or ``run_id``), register a new version
    of ``name`` with ``tags``, and move the aliases by ``score`` (higher is better).

    ``weights`` is the merged state dict (or a function giving it, called only when a new
    version is made); alternatively ``index_path`` names a CART index
    (:mod:`mergeflow.cart_index`), and the model rebuilds each task's weights from it;
    ``complement`` holds the tensors an index lacks (the base's text tower of a vision-only
    fine-tune), loaded under every rebuilt task.

    Idempotent: a version already registered under ``registration_key`` (a digest of what
    the model is made from and scored on) is returned as it is, so a retried task or a
    re-run makes no second version. ``report_data`` is the digest of the data ``score`` was
    taken on; the champion is compared on the same data: by its recorded score when its
    data digest matches, else by ``rescore(model_uri)`` (without it, the champion stays).
    ``artifacts``: extra files (run-relative path → local file) logged beside the model."""
    if (weights is None) == (index_path is None):
        raise ValueError("give either weights or index_path")
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    reused = reuse_version(client, name, registration_key, score, report_data, rescore)
    if reused is not None:
        return reused

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="mergeflow-register-") as tmp:
        tmp = Path(tmp)
        model_artifacts = {
            "heads": str(tmp / "heads.safetensors"),
            "meta": str(tmp / "meta.json"),
        }
        if weights is not None:
            state = weights() if callable(weights) else weights
            weights_file = tmp / "weights.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(weights_file))
            model_artifacts["weights"] = str(weights_file)
        else:
            model_artifacts["index"] = str(index_path)
        save_file({k: v.contiguous() for k, v in heads.items()}, model_artifacts["heads"])
        if complement:
            model_artifacts["complement"] = str(tmp / "complement.safetensors")
            save_file(
                {k: v.contiguous() for k, v in complement.items()}, model_artifacts["complement"]
            )
        from mergeflow.models import resolve_model

        meta = {
            "model": model_config,
            # the architecture itself, so a transformers-CLIP model loads where its
            # config.json is not
            "architecture": resolve_model(model_config).to_json(),
            "classes": {k: list(v) for k, v in classes.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        active = mlflow.active_run()
        reuse = active is not None and run_id in (None, active.info.run_id)
        context = nullcontext(active) if reuse else mlflow.start_run(run_id=run_id)
        with context as run:
            mlflow.log_params({k: v for k, v in params.items()})
            mlflow.log_metrics(dict(metrics))
            for artifact_path, local in (artifacts or {}).items():
                mlflow.log_artifact(local, str(Path(artifact_path).parent or ""))
            with _LOADING_MODEL_CODE:
                info = mlflow.pyfunc.log_model(
                    name="merged_model",
                    python_model=str(MODEL_CODE),
                    artifacts=model_artifacts,
                    pip_requirements=[
                        "mergeflow",
                        "torch",
                        "open_clip_torch",
                        "safetensors",
                        "pandas",
                    ],
                )
            run_id = run.info.run_id
    version = mlflow.register_model(
        info.model_uri,
        name,
        tags={
            **tags,
            SCORE_TAG: repr(score),
            REPORT_DATA_TAG: report_data,
            REGISTRATION_KEY_TAG: registration_key,
        },
    )
    # two runs registering one model at once both find none and both register: the lowest
    # version under the key stays, and a later one removes itself
    twins = [
        int(v.version)
        for v in client.search_model_versions(f"name='{name}'")
        if v.tags.get(REGISTRATION_KEY_TAG) == registration_key
    ]
    if min(twins, default=int(version.version)) < int(version.version):
        log.info(
            "%s version %s duplicates version %s; removing it", name, version.version, min(twins)
        )
        client.delete_model_version(name, version.version)
        reused = reuse_version(client, name, registration_key, score, report_data, rescore)
        if reused is None:
            raise LookupError(f"{name}: the version registered under this model vanished")
        return reused
    aliases, previous = _move_aliases(client, name, version, score, report_data, rescore)
    return Registration(name, str(version.version), run_id, aliases, previous)


def _move_aliases(client, name: str, version, score: float, report_data: str, rescore):
    """``champion`` to ``version`` if it beats the champion on the same report data, else
    ``challenger``; returns the aliases given and the previous champion's version."""
    champion = current_champion(client, name)
    if champion is not None and str(champion.version) == str(version.version):
        return (CHAMPION,), None  # a concurrent run of the same model settled it already
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        log.info("version %s of %s is the first champion (%.4f)", version.version, name, score)
        return (CHAMPION,), None
    if champion.tags.get(REPORT_DATA_TAG) == report_data and SCORE_TAG in champion.tags:
        champion_score = float(champion.tags[SCORE_TAG])
    elif rescore is not None:
        try:
            champion_score = rescore(f"models:/{name}/{champion.version}")
        except Exception as exc:  # an unreadable champion is kept, never replaced blindly
            log.warning(
                "champion %s of %s was scored on other report data and rescoring it failed "
                "(%s: %s): it stays champion",
                champion.version,
                name,
                type(exc).__name__,
                exc,
            )
            champion_score = math.inf
        else:
            log.info(
                "champion %s of %s was scored on other data; on this run's: %.4f",
                champion.version,
                name,
                champion_score,
            )
    else:
        log.warning(
            "champion %s of %s was scored on other report data and cannot be rescored here: "
            "it stays champion",
            champion.version,
            name,
        )
        champion_score = math.inf
    if score > champion_score:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        log.info(
            "version %s of %s is the new champion (%.4f > %.4f)",
            version.version,
            name,
            score,
            champion_score,
        )
        return (CHAMPION,), str(champion.version)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    log.info(
        "version %s of %s is a challenger (%.4f <= champion %.4f)",
        version.version,
        name,
        score,
        champion_score,
    )
    return (CHALLENGER,), str(champion.version)


def promote(client, name: str, version: str, score: float, champion_score: float) -> bool:
    """Give ``champion`` to ``version`` when ``score`` beats ``champion_score`` (both taken
    on the same data by the caller); returns whether it moved."""
    if score <= champion_score:
        log.info(
            "version %s of %s stays behind the champion (%.4f <= %.4f)",
            version,
            name,
            score,
            champion_score,
        )
        return False
    client.set_registered_model_alias(name, CHAMPION, version)
    log.info(
        "version %s of %s is the new champion (%.4f > %.4f)", version, name, score, champion_score
    )
    return True
