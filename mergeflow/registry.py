"""The MLflow model registry: merged models as pyfunc models that classify images.

A registered version holds the merged weights (safetensors), every task's frozen zero-shot
head and class names, and the open_clip config name. ``mlflow.pyfunc.load_model`` gives a
model whose ``predict`` takes a DataFrame with a ``task`` column and an ``image`` column
(PNG/JPEG bytes, or H×W(×C) uint8 arrays) and returns the predicted class per row.

Aliases, never stages: a new version gets ``challenger``; ``champion`` moves to it only
when its score beats the score of the version that holds ``champion`` now.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
SCORE_TAG = "mergeflow.score"
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


def current_champion(client, name: str):
    """The version holding ``champion``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register_merged_model(
    name: str,
    model_config: str,
    weights: Mapping[str, torch.Tensor] | None,
    heads: Mapping[str, torch.Tensor],
    classes: Mapping[str, tuple[str, ...]],
    score: float,
    params: Mapping[str, object],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    run_id: str | None = None,
    index_path: str | None = None,
) -> Registration:
    """Log the merged model in a run (the active one or ``run_id``), register a new version
    of ``name`` with ``tags``, and move the aliases by ``score`` (higher is better).

    ``weights`` is the merged state dict; alternatively ``index_path`` names a CART index
    (:mod:`mergeflow.cart_index`), and the model rebuilds each task's weights from it."""
    if (weights is None) == (index_path is None):
        raise ValueError("give either weights or index_path")
    from safetensors.torch import save_file

    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory(prefix="mergeflow-register-") as tmp:
        tmp = Path(tmp)
        if weights is not None:
            weights_file = tmp / "weights.safetensors"
            save_file({k: v.contiguous() for k, v in weights.items()}, str(weights_file))
        save_file({k: v.contiguous() for k, v in heads.items()}, str(tmp / "heads.safetensors"))
        (tmp / "meta.json").write_text(
            json.dumps({"model": model_config, "classes": {k: list(v) for k, v in classes.items()}})
        )
        artifacts = {
            "heads": str(tmp / "heads.safetensors"),
            "meta": str(tmp / "meta.json"),
        }
        if weights is not None:
            artifacts["weights"] = str(weights_file)
        else:
            artifacts["index"] = str(index_path)
        active = mlflow.active_run()
        reuse = active is not None and run_id in (None, active.info.run_id)
        context = nullcontext(active) if reuse else mlflow.start_run(run_id=run_id)
        with context as run:
            mlflow.log_params({k: v for k, v in params.items()})
            mlflow.log_metrics(dict(metrics))
            info = mlflow.pyfunc.log_model(
                name="merged_model",
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                pip_requirements=["mergeflow", "torch", "open_clip_torch", "safetensors", "pandas"],
            )
            run_id = run.info.run_id
    version = mlflow.register_model(info.model_uri, name, tags={**tags, SCORE_TAG: repr(score)})
    champion = current_champion(client, name)
    aliases = [CHALLENGER]
    previous = champion.version if champion else None
    champion_score = float(champion.tags.get(SCORE_TAG, "-inf")) if champion else float("-inf")
    if score > champion_score:
        aliases = [CHAMPION]
        client.set_registered_model_alias(name, CHAMPION, version.version)
        log.info(
            "version %s of %s is the new champion (%.4f > %.4f)",
            version.version,
            name,
            score,
            champion_score,
        )
    else:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        log.info(
            "version %s of %s is a challenger (%.4f <= champion %.4f)",
            version.version,
            name,
            score,
            champion_score,
        )
    return Registration(
        name,
        str(version.version),
        run_id,
        tuple(aliases),
        str(previous) if previous is not None else None,
    )
