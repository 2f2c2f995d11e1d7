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
import warnings
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
ROUTED_MODEL_CODE = Path(__file__).with_name("mlflow_routed.py")


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


@dataclass(frozen=True)
class Gate:
    """How ``champion`` moves: ``score`` (higher is better) was taken on the report data
    whose digest is ``report_data``; a champion scored on other data is compared by
    ``rescore(model_uri)`` (without it, the champion stays)."""

    score: float
    report_data: str
    rescore: Callable[[str], float] | None = None


@dataclass(frozen=True)
class ModelFiles:
    """What a registered version holds: the merged ``weights`` (a state dict, or a function
    giving it, called only when a new version is made) or a CART index at ``index_path``
    (:mod:`mergeflow.cart_index`: the model rebuilds each task's weights from it) or a
    Twin-Merging file at ``twin_path`` (:mod:`mergeflow.twin`: a routed model), every
    task's frozen head (C, D) and class names, the model's config name, and ``complement``:
    tensors an index lacks (a vision-only fine-tune's text tower), loaded under every task."""

    config: str
    heads: Mapping[str, torch.Tensor]
    classes: Mapping[str, tuple[str, ...]]
    weights: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] | None = None
    index_path: str | None = None
    complement: Mapping[str, torch.Tensor] | None = None
    twin_path: str | None = None

    def __post_init__(self):
        given = [x is not None for x in (self.weights, self.index_path, self.twin_path)]
        if sum(given) != 1:
            raise ValueError("give one of weights, index_path and twin_path")

    @property
    def routed(self) -> bool:
        """Whether this is a Twin-Merging routed model (:mod:`mergeflow.mlflow_routed`)."""
        return self.twin_path is not None


def registered(name: str, registration_key: str, gate: Gate) -> Registration | None:
    """The version of ``name`` already registered under ``registration_key`` (its aliases
    settled if the attempt that made it stopped before), or None when there is none."""
    client = _mlflow().MlflowClient()
    existing = find_version(client, name, registration_key)
    if existing is None:
        return None
    log.info(
        "%s version %s already holds this model; not registering again", name, existing.version
    )
    aliases, previous = tuple(existing.aliases or ()), None
    if not aliases:
        aliases, previous = _move_aliases(client, name, existing, gate)
    return Registration(name, str(existing.version), existing.run_id, aliases, previous, True)


def _signature():
    """What the model takes and gives (mergeflow/mlflow_model.py): rows of ``task`` and
    ``image``, and per row the predicted class's index and name. The image column is typed
    "any": it takes encoded bytes, ``{"bytes": ...}`` dicts and uint8 arrays alike."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "task"), ColSpec(AnyType(), "image")]),
        outputs=Schema([ColSpec("long", "label_index"), ColSpec("string", "label")]),
    )


def _routed_signature():
    """What a routed model (mergeflow/mlflow_routed.py) takes and gives: rows of ``image``
    (a ``task`` column is optional), and per row the routed task and the class."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "task", required=False), ColSpec(AnyType(), "image")]),
        outputs=Schema(
            [
                ColSpec("string", "task"),
                ColSpec("long", "label_index"),
                ColSpec("string", "label"),
            ]
        ),
    )


def register_model(
    name: str,
    files: ModelFiles,
    gate: Gate,
    registration_key: str,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> Registration:
    """Log ``files`` as a pyfunc model in the run ``run_id`` (else the active run, else a new
    one), register it as a new version of ``name`` with ``tags``, and move the aliases
    through ``gate``.

    Idempotent: a version already registered under ``registration_key`` (a digest of what
    the model is made from and scored on) is returned as it is, so a retried task or a
    re-run makes no second version."""
    reused = registered(name, registration_key, gate)
    if reused is not None:
        return reused
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory(prefix="mergeflow-register-") as tmp:
        model_artifacts = _write_model_files(files, Path(tmp))
        active = mlflow.active_run()
        reuse = active is not None and run_id in (None, active.info.run_id)
        context = nullcontext(active) if reuse else mlflow.start_run(run_id=run_id)
        with context as run, _LOADING_MODEL_CODE, warnings.catch_warnings():
            # the signature is given; an example would only make MLflow load the model and
            # run it once more at logging time
            warnings.filterwarnings("ignore", ".*An input example was not provided", UserWarning)
            info = mlflow.pyfunc.log_model(
                name="merged_model",
                python_model=str(ROUTED_MODEL_CODE if files.routed else MODEL_CODE),
                artifacts=model_artifacts,
                signature=_routed_signature() if files.routed else _signature(),
                pip_requirements=["mergeflow", "torch", "open_clip_torch", "safetensors", "pandas"],
            )
            run_id = run.info.run_id
    version = mlflow.register_model(
        info.model_uri,
        name,
        tags={
            **(tags or {}),
            SCORE_TAG: repr(gate.score),
            REPORT_DATA_TAG: gate.report_data,
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
        reused = registered(name, registration_key, gate)
        if reused is None:
            raise LookupError(f"{name}: the version registered under this model vanished")
        return reused
    aliases, previous = _move_aliases(client, name, version, gate)
    return Registration(name, str(version.version), run_id, aliases, previous)


def _write_model_files(files: ModelFiles, folder: Path) -> dict[str, str]:
    """The model's artifacts written under ``folder``: name → local path."""
    from safetensors.torch import save_file

    from mergeflow.models import resolve_model

    def save(tensors, name: str) -> str:
        path = str(folder / name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        return path

    artifacts = {"heads": save(files.heads, "heads.safetensors")}
    if files.weights is not None:
        state = files.weights() if callable(files.weights) else files.weights
        artifacts["weights"] = save(state, "weights.safetensors")
    elif files.index_path is not None:
        artifacts["index"] = str(files.index_path)
    else:
        artifacts["twin"] = str(files.twin_path)
    if files.complement:
        artifacts["complement"] = save(files.complement, "complement.safetensors")
    meta = {
        "model": files.config,
        # the architecture itself, so a transformers-CLIP model loads where its config.json
        # is not
        "architecture": resolve_model(files.config).to_json(),
        "classes": {k: list(v) for k, v in files.classes.items()},
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    artifacts["meta"] = str(folder / "meta.json")
    return artifacts


def _move_aliases(client, name: str, version, gate: Gate):
    """``champion`` to ``version`` if it beats the champion on the same report data, else
    ``challenger``; returns the aliases given and the previous champion's version."""
    score, report_data, rescore = gate.score, gate.report_data, gate.rescore
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
