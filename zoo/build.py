"""Write zoo tasks as Hugging Face parquet splits (PNG images + ClassLabel labels)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zoo.sources import TaskData


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(task: TaskData, indices: Sequence[int], path: str | Path) -> Path:
    """One split of ``task`` as a parquet file with an ``image`` and a ``label`` column."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(task.classes))}
    )
    rows = {
        "image": [{"bytes": png_bytes(task.images[i]), "path": None} for i in indices],
        "label": [int(task.labels[i]) for i in indices],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.disable_progress_bars()  # one bar per tiny file is noise; the zoo reports per task
    try:
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    finally:
        datasets.enable_progress_bars()
    return path


def split_indices(n: int, test: int, validation: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed random split: ``test`` and ``validation`` samples, the rest for training."""
    order = np.random.default_rng(seed).permutation(n)
    return {
        "test": order[:test],
        "validation": order[test : test + validation],
        "train": order[test + validation :],
    }
