"""The MLflow pyfunc model of a Twin-Merging routed CLIP (:mod:`mergeflow.twin`), logged as
code (see mergeflow.registry).

``predict`` takes a DataFrame with an ``image`` column (PNG/JPEG bytes, ``{"bytes": ...}``
dicts, or H×W(×C) uint8 arrays); no ``task`` column is needed. The router names each row's
task from the shared model's features, the row's weights θ(x) = θ* + Σ_t w_t · v_t are
synthesized (one synthesis per routed task of the batch, or per row: the model's
``routing``), and the class is read with the routed task's head. A ``task`` column, where
given, picks the head instead (the twin vectors are still mixed by the router). Returns per
row the task, the class index and the class name.
"""

import json
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import set_model


class RoutedClip(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from safetensors.torch import load_file

        from mergeflow.mlflow_model import _to_pil
        from mergeflow.models import ClipArchitecture, create_model, image_transform
        from mergeflow.twin import load_twin, read_twin

        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.config = meta["model"]
        architecture = ClipArchitecture.from_json(meta["architecture"])
        self.classes = {task: tuple(names) for task, names in meta["classes"].items()}
        self.heads = load_file(context.artifacts["heads"])
        complement = (
            load_file(context.artifacts["complement"]) if "complement" in context.artifacts else {}
        )
        parts = read_twin(context.artifacts["twin"])
        model = create_model(architecture, {**complement, **parts.shared})
        self.twin = load_twin(parts, model, complement)
        self.transform = image_transform(model)
        self._to_pil = _to_pil

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = torch.stack([self.transform(self._to_pil(v)) for v in model_input["image"]])
        features, weights = self.twin.image_features(images)
        routed = [self.twin.tasks[i] for i in weights.argmax(1).tolist()]
        tasks = list(model_input["task"]) if "task" in model_input else routed
        unknown = set(tasks) - set(self.heads)
        if unknown:
            known = ", ".join(sorted(self.heads))
            raise ValueError(f"unknown task {sorted(unknown)[0]!r} (this model knows: {known})")
        index = []
        scale = self.twin.model.logit_scale.exp().float()
        with torch.no_grad():
            for row, task in enumerate(tasks):
                logits = scale * features[row] @ self.heads[task].to(features).T
                index.append(int(logits.argmax()))
        names = [self.classes[t][i] for t, i in zip(tasks, index, strict=True)]
        return pd.DataFrame(
            {"task": tasks, "label_index": index, "label": names}, index=model_input.index
        )


set_model(RoutedClip())
