"""Task datasets read with Hugging Face ``datasets``, decoded and preprocessed once.

A :class:`DatasetSpec` points at parquet (a file, or a folder holding ``SPLIT.parquet``), an
imagefolder directory, or a hub id. Remote parquet files go through mergeflow's verified
URI + ETag cache, so ``datasets`` only ever reads local files. The decoded, preprocessed
images of a split are computed once and kept as a float tensor on disk, keyed by the data's
digest and the transform, so scoring many merged candidates never decodes an image twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.errors import ParameterError
from mergeflow.spec import DatasetSpec
from mergeflow.storage import CheckpointCache, is_remote

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedSplit:
    """A split ready for the model: ``images`` (N, 3, H, W) float32, ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    label_names: tuple[str, ...] | None
    digest: str


def _format_of(spec: DatasetSpec) -> str:
    if spec.format != "auto":
        return spec.format
    uri = spec.uri.rstrip("/")
    if uri.endswith(".parquet") or is_remote(uri):
        return "parquet"
    if Path(uri).is_dir():
        has_parquet = any(Path(uri).glob("*.parquet"))
        return "parquet" if has_parquet else "imagefolder"
    return "hub"


def _parquet_file(spec: DatasetSpec, split: str) -> str:
    uri = spec.uri.rstrip("/")
    return uri if uri.endswith(".parquet") else posixpath.join(uri, f"{split}.parquet")


def load_split(spec: DatasetSpec, split: str, cache: CheckpointCache | None = None):
    """The ``datasets.Dataset`` of one split, and a digest of the bytes it came from."""
    import datasets

    cache = cache or CheckpointCache()
    fmt = _format_of(spec)
    try:
        if fmt == "parquet":
            copy = cache.fetch(_parquet_file(spec, split))
            datasets.disable_progress_bars()  # a bar per small split buries the pipeline's own
            try:
                data = datasets.Dataset.from_parquet(str(copy.path))
            finally:
                datasets.enable_progress_bars()
            digest = copy.digest()
        else:
            if fmt == "imagefolder":
                data = datasets.load_dataset("imagefolder", data_dir=spec.uri, split=split)
            else:
                data = datasets.load_dataset(spec.uri, split=split)
            identity = json.dumps([spec.uri, split, data._fingerprint])
            digest = hashlib.sha256(identity.encode()).hexdigest()
    except ParameterError:
        raise
    except Exception as exc:
        raise ParameterError(
            f"dataset {spec.uri}: cannot read split {split!r} ({type(exc).__name__}: {exc})"
        ) from None
    for column in (spec.image_column, spec.label_column):
        if column not in data.column_names:
            raise ParameterError(
                f"dataset {spec.uri}, split {split!r}: no column {column!r} "
                f"(columns: {', '.join(data.column_names)})"
            )
    if spec.max_samples is not None and len(data) > spec.max_samples:
        data = data.select(range(spec.max_samples))
    return data, digest


def label_names(data, spec: DatasetSpec) -> tuple[str, ...] | None:
    feature = data.features.get(spec.label_column)
    names = getattr(feature, "names", None)
    return tuple(names) if names else None


def prepare_split(
    spec: DatasetSpec,
    split: str,
    transform,
    transform_key: str,
    cache: CheckpointCache | None = None,
) -> PreparedSplit:
    """Decode and preprocess a split once; later calls read the tensors from disk."""
    from safetensors.torch import load_file

    from mergeflow.checkpoints import save_state_dict

    cache = cache or CheckpointCache()
    data, digest = load_split(spec, split, cache)
    key = hashlib.sha256(
        json.dumps(
            [digest, spec.image_column, spec.label_column, spec.max_samples, transform_key]
        ).encode()
    ).hexdigest()[:40]
    path = cache.root / "prepared" / f"{key}.safetensors"
    names = label_names(data, spec)
    if path.is_file():
        tensors = load_file(str(path))
        return PreparedSplit(tensors["images"], tensors["labels"], names, key)
    images, labels = [], []
    for row in data:
        image = row[spec.image_column]
        if not hasattr(image, "convert"):
            raise ParameterError(
                f"dataset {spec.uri}, split {split!r}: column {spec.image_column!r} holds "
                f"{type(image).__name__}, not images"
            )
        images.append(transform(image))
        labels.append(int(row[spec.label_column]))
    prepared = PreparedSplit(
        torch.stack(images).float().contiguous(),
        torch.tensor(labels, dtype=torch.int64),
        names,
        key,
    )
    save_state_dict({"images": prepared.images, "labels": prepared.labels}, path)
    log.info("prepared %s/%s: %d images", spec.uri, split, len(labels))
    return prepared
