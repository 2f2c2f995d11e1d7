"""The MLflow pyfunc model of a merged CLIP: logged as code (see mergeflow.registry).

``predict`` takes a DataFrame with a ``task`` column and an ``image`` column (PNG/JPEG
bytes, ``{"bytes": ...}`` dicts, or H×W(×C) uint8 arrays) and returns, per row, the index
and name of the predicted class. A model logged with a CART index instead of weights
rebuilds the weights of each task it is asked about (the last one stays loaded).
"""

import io
import json
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import set_model


def _to_pil(value):
    from PIL import Image

    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, dict) and "bytes" in value:
        return Image.open(io.BytesIO(value["bytes"]))
    import numpy as np

    return Image.fromarray(np.asarray(value, dtype=np.uint8))


class MergedClip(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from safetensors.torch import load_file

        from mergeflow.models import ClipArchitecture, create_model, image_transform

        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.config = meta["model"]
        architecture = (
            ClipArchitecture.from_json(meta["architecture"]) if "architecture" in meta else None
        )
        self.classes = {task: tuple(names) for task, names in meta["classes"].items()}
        self.heads = load_file(context.artifacts["heads"])
        self.complement = (
            load_file(context.artifacts["complement"]) if "complement" in context.artifacts else {}
        )
        self.index = None
        self.loaded_task = None
        if "index" in context.artifacts:
            from mergeflow.cart_index import CartIndex

            self.index = CartIndex.load(context.artifacts["index"])
            self.loaded_task = self.index.tasks[0]
            weights = self.index.rebuild(self.loaded_task)
        else:
            weights = load_file(context.artifacts["weights"])
        self.model = create_model(architecture or meta["model"], {**self.complement, **weights})
        self.transform = image_transform(self.model)

    def _use_task(self, task: str) -> None:
        if self.index is not None and task != self.loaded_task:
            from mergeflow.hf_clip import to_open_clip

            rebuilt = {**self.complement, **self.index.rebuild(task)}
            self.model.load_state_dict(to_open_clip(rebuilt))
            self.loaded_task = task

    # typed, or MLflow warns each time it loads this code; the schema is the signature the
    # registry logs with the model (its image column takes several forms)
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from mergeflow.models import classify

        unknown = set(model_input["task"]) - set(self.heads)
        if unknown:
            known = ", ".join(sorted(self.heads))
            raise ValueError(f"unknown task {sorted(unknown)[0]!r} (this model knows: {known})")
        index = [0] * len(model_input)
        names = [""] * len(model_input)
        positions = {label: i for i, label in enumerate(model_input.index)}
        for task, group in model_input.groupby("task", sort=False):
            self._use_task(task)
            images = torch.stack([self.transform(_to_pil(v)) for v in group["image"]])
            with torch.no_grad():
                predicted = classify(self.model, self.heads[task], images).argmax(1).tolist()
            for label, p in zip(group.index, predicted, strict=True):
                index[positions[label]] = p
                names[positions[label]] = self.classes[task][p]
        return pd.DataFrame({"label_index": index, "label": names}, index=model_input.index)


set_model(MergedClip())
