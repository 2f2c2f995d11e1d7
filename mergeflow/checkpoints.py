"""Checkpoint readers and writers.

Readers give a checkpoint's layout (key → shape, dtype) without loading it and load one
tensor at a time, so a merge over T checkpoints holds the output plus a few tensors per
task, never T whole models. Where a checkpoint is (a file, a model folder, a hub reference)
is :mod:`mergeflow.sources`' business; formats are recognised by content, not file name:

- safetensors, read with positioned reads of one tensor at a time;
- sharded checkpoints, a ``*.index.json`` whose ``weight_map`` names the shards
  (safetensors or torch files);
- torch files, loaded with ``torch.load(weights_only=True)`` (memory-mapped when the file
  allows it); a nested ``state_dict`` entry and ``module.`` prefixes (DataParallel) are
  unwrapped. A whole pickled module (``torch.save(model)``) is read by
  :mod:`mergeflow.safe_pickle`, which runs none of its code;
- PEFT LoRA adapters, seen as the whole fine-tuned model base + ΔW (:mod:`mergeflow.lora`).

The task-vectors papers' ``ImageEncoder`` layout (``model.`` before open_clip's names, text
tower deleted) is read under open_clip's names. Everything is written as safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import posixpath
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mergeflow.errors import CheckpointError
from mergeflow.statedict import Layout, StateDict, layout_of
from mergeflow.storage import CheckpointCache, LocalCopy, is_remote, staged_output

if TYPE_CHECKING:
    from mergeflow.sources import CheckpointSource

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class CheckpointReader(ABC):
    """Lazy access to one checkpoint. ``name`` (its URI) appears in every error; ``source``
    says where its files came from (None for a state dict in memory)."""

    name: str
    source: CheckpointSource | None = None
    files: tuple[LocalCopy, ...] = ()
    """the local copies its tensors are read from (for remote files: the cache's)"""
    format: str = "state dict"
    """what the weights were read from: safetensors, torch, a pickled module, shards, …"""

    @abstractmethod
    def layout(self) -> Layout:
        """Shape and dtype of every tensor, in the checkpoint's key order."""

    @abstractmethod
    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, on the CPU."""

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``key`` along its first dimension (a 0-d tensor whole):
        readers that can read part of a tensor override this to read only those rows."""
        tensor = self.get(key)
        return tensor[start:stop] if tensor.dim() else tensor

    def keys(self) -> list[str]:
        return list(self.layout())

    def low_rank_factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) with the task vector of ``key`` equal to B A (float32), for readers whose
        weights are a base plus low-rank factors (LoRA adapters); None for the others."""
        return None

    def metadata(self) -> dict[str, str]:
        return {}

    def to_state_dict(self) -> StateDict:
        return {key: self.get(key) for key in self.layout()}

    def close(self) -> None:  # noqa: B027 (optional: readers with open files override it)
        """Release open files."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _missing(self, key: str) -> CheckpointError:
        return CheckpointError(f"{self.name}: has no tensor {key!r}")


class StateDictReader(CheckpointReader):
    """A reader over a state dict already in memory."""

    def __init__(self, state: Mapping[str, torch.Tensor], name: str = "<state dict>"):
        self.name = name
        self._state = dict(state)
        self._layout = layout_of(self._state)

    def layout(self) -> Layout:
        return dict(self._layout)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._state[key]
        except KeyError:
            raise self._missing(key) from None


class SafetensorsReader(CheckpointReader):
    """One ``.safetensors`` file. The header is parsed and checked when opened; each tensor
    is read with one positioned read into fresh memory, so nothing stays memory-mapped and
    the process holds only the tensors its caller keeps."""

    MAX_HEADER_BYTES = 100 * 2**20
    format = "safetensors"

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{self.name}: cannot open ({exc.strerror})") from None
        try:
            self._layout, self._spans, self._metadata = self._read_header()
        except Exception:
            self.close()
            raise

    def _read_header(self):
        file_size = os.fstat(self._fd).st_size
        prefix = os.pread(self._fd, 8, 0)
        if len(prefix) < 8:
            raise CheckpointError(f"{self.name}: truncated safetensors header")
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(self.MAX_HEADER_BYTES, file_size - 8):
            raise CheckpointError(f"{self.name}: safetensors header size {header_size} is invalid")
        try:
            header = json.loads(os.pread(self._fd, header_size, 8))
        except ValueError as exc:
            raise CheckpointError(f"{self.name}: unreadable safetensors header ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.name}: safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_size
        layout: Layout = {}
        spans: dict[str, tuple[int, int]] = {}
        for key, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{self.name}: tensor {key!r} has an invalid or unsupported header entry"
                ) from None
            numel = 1
            for d in shape:
                numel *= d
            expected = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected or begin < 0:
                raise CheckpointError(
                    f"{self.name}: tensor {key!r} spans {end - begin} bytes, "
                    f"its shape {shape} and dtype need {expected}"
                )
            if data_start + end > file_size:
                raise CheckpointError(
                    f"{self.name}: truncated: tensor {key!r} ends at byte {data_start + end} "
                    f"of a {file_size}-byte file"
                )
            layout[key] = (shape, dtype)
            spans[key] = (data_start + begin, end - begin)
        return layout, spans, {str(k): str(v) for k, v in metadata.items()}

    def layout(self) -> Layout:
        return dict(self._layout)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._layout:
            raise self._missing(key)
        shape, dtype = self._layout[key]
        offset, size = self._spans[key]
        return self._read(key, offset, size).view(dtype).reshape(shape)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        if key not in self._layout:
            raise self._missing(key)
        shape, dtype = self._layout[key]
        if not shape:
            return self.get(key)
        stop = min(stop, shape[0])
        offset, size = self._spans[key]
        row = size // shape[0] if shape[0] else 0
        rows = self._read(key, offset + start * row, (stop - start) * row)
        return rows.view(dtype).reshape(stop - start, *shape[1:])

    def _read(self, key: str, offset: int, size: int) -> torch.Tensor:
        buffer = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        done = 0
        while done < size:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise CheckpointError(f"{self.name}: file ended while reading tensor {key!r}")
            done += n
        return buffer

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close


class ShardedReader(CheckpointReader):
    """A ``*.index.json`` and the shards (safetensors or torch files) its ``weight_map``
    names."""

    def __init__(self, index: LocalCopy, cache: CheckpointCache):
        from mergeflow.sources import join, shard_names

        self.name = index.uri
        weight_map = json.loads(index.path.read_text())["weight_map"]
        self.shard_files = sorted(shard_names(index))
        folder = (
            posixpath.dirname(index.uri) if is_remote(index.uri) else os.path.dirname(index.uri)
        )
        self._shards: dict[str, CheckpointReader] = {}
        copies = [index]
        for shard_name in self.shard_files:
            copies.append(cache.fetch(join(folder, shard_name) if folder else shard_name))
            self._shards[shard_name] = open_file(copies[-1])
        self.files = tuple(copies)
        self._shard_of: dict[str, CheckpointReader] = {}
        for key, shard_name in weight_map.items():
            shard = self._shards[shard_name]
            if key not in shard.layout():
                raise CheckpointError(
                    f"{self.name}: {key!r} is mapped to {shard_name}, which lacks it"
                )
            self._shard_of[key] = shard
        for shard_name, shard in self._shards.items():
            unmapped = [k for k in shard.layout() if k not in weight_map]
            if unmapped:
                raise CheckpointError(
                    f"{self.name}: {shard_name} holds {unmapped[0]!r}, which the index does "
                    "not map (a stale or mixed-up shard)"
                )

        kinds = sorted({shard.format for shard in self._shards.values()})
        self.format = f"sharded {'/'.join(kinds)} ({len(self._shards)} shards)"

    def layout(self) -> Layout:
        return {key: shard.layout()[key] for key, shard in self._shard_of.items()}

    def get(self, key: str) -> torch.Tensor:
        if key not in self._shard_of:
            raise self._missing(key)
        return self._shard_of[key].get(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        if key not in self._shard_of:
            raise self._missing(key)
        return self._shard_of[key].get_rows(key, start, stop)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


class RenamedReader(CheckpointReader):
    """Another reader's tensors under new names (``names``: new name → stored name)."""

    def __init__(self, inner: CheckpointReader, names: Mapping[str, str]):
        self.inner = inner
        self.name = inner.name
        self.format = inner.format
        self.files = inner.files
        self._names = dict(names)
        stored = inner.layout()
        self._layout = {new: stored[old] for new, old in self._names.items()}

    def layout(self) -> Layout:
        return dict(self._layout)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._names:
            raise self._missing(key)
        return self.inner.get(self._names[key])

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        if key not in self._names:
            raise self._missing(key)
        return self.inner.get_rows(self._names[key], start, stop)

    def metadata(self) -> dict[str, str]:
        return self.inner.metadata()

    def close(self) -> None:
        self.inner.close()


_TASK_VECTORS_IMAGE_ENCODER = re.compile(
    r"^model\.visual\.(conv1\.weight|transformer\.resblocks\.)"
)
_LORA_FACTOR = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")


def _normalized(reader: CheckpointReader) -> CheckpointReader:
    """Refuse bare LoRA factors; read the task-vectors ``ImageEncoder`` layout (every key
    under ``model.``) under open_clip's own names, and a transformers CLIP vision tower
    under the names its ``CLIPModel`` gives it."""
    keys = reader.keys()
    factor = next((k for k in keys if _LORA_FACTOR.search(k)), None)
    if factor is not None:
        raise CheckpointError(
            f"{reader.name}: holds LoRA factors ({factor!r}) without the adapter_config.json "
            "that says how to scale them; give the adapter's folder (merging lora_A and "
            "lora_B apart would be wrong)"
        )
    if (
        keys
        and all(k.startswith("model.") for k in keys)
        and any(_TASK_VECTORS_IMAGE_ENCODER.match(k) for k in keys)
    ):
        renamed = RenamedReader(reader, {k.removeprefix("model."): k for k in keys})
        renamed.format = f"{reader.format}, task-vectors ImageEncoder names (model.*)"
        return renamed
    # transformers 5 saves CLIPVisionModel without the vision_model. its CLIPModel has
    # (transformers 4 and FusionBench's hub checkpoints keep it): one name for both
    if "pre_layrnorm.weight" in keys and "embeddings.patch_embedding.weight" in keys:
        renamed = RenamedReader(reader, {f"vision_model.{k}": k for k in keys})
        renamed.format = f"{reader.format}, a CLIP vision tower read as vision_model.*"
        return renamed
    return reader


def normalize_state_dict(obj: object, name: str) -> StateDict:
    """Unwrap nested ``state_dict`` entries and strip ``module.`` prefixes; every value must
    be a tensor."""
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: holds a {type(obj).__name__}, not a state dict")
    state: StateDict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            pickled = getattr(value, "__mergeflow_global__", None)
            if pickled is not None:
                raise CheckpointError(
                    f"{name}: refused: entry {key!r} is a pickled {pickled} object, not a "
                    "tensor (nothing in it was run)"
                )
            raise CheckpointError(
                f"{name}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        clean = key[len("module.") :] if key.startswith("module.") else key
        if clean in state:
            raise CheckpointError(f"{name}: key {clean!r} appears with and without 'module.'")
        state[clean] = value
    return state


def read_torch_file(path: str | os.PathLike, name: str) -> StateDict:
    """A torch checkpoint's state dict, without running pickled code (see
    :func:`read_torch_file_kind`)."""
    return read_torch_file_kind(path, name)[0]


def read_torch_file_kind(path: str | os.PathLike, name: str) -> tuple[StateDict, str]:
    """A torch checkpoint's state dict and what it held: tensors and containers through
    ``weights_only=True`` (``"torch"``); a whole pickled module through
    :func:`mergeflow.safe_pickle.load_pickled_module`, where every other global is inert
    (``"pickled module CLASS"``)."""
    kind = "torch"
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(exc))
        if blocked is None:
            raise CheckpointError(f"{name}: not a readable torch checkpoint ({exc})") from None
        from mergeflow.safe_pickle import load_pickled_module

        obj, held = load_pickled_module(path, name)
        if held != "dict":
            kind = f"pickled module {held}"
            log.info("%s: read the tensors of a pickled %s (none of its code ran)", name, held)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{name}: not a readable torch checkpoint ({exc})") from None
    return normalize_state_dict(obj, name), kind


def sniff_format(path: Path, name: str) -> str:
    """``"safetensors"`` or ``"torch"``, from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f"{name}: empty file")
    # safetensors first: its 8-byte header length may well start with 0x80, a pickle's mark
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    raise CheckpointError(f"{name}: neither a safetensors nor a torch checkpoint")


def open_file(copy: LocalCopy) -> CheckpointReader:
    """A reader for one safetensors or torch file."""
    if sniff_format(copy.path, copy.uri) == "safetensors":
        return SafetensorsReader(copy.path, copy.uri)
    state, kind = read_torch_file_kind(copy.path, copy.uri)
    reader = StateDictReader(state, copy.uri)
    reader.format = kind
    return reader


def open_checkpoint(
    uri: str | os.PathLike,
    cache: CheckpointCache | None = None,
    base: CheckpointReader | None = None,
) -> CheckpointReader:
    """A lazy reader for the checkpoint at ``uri``: a file, a model folder (local or
    ``s3://``) or an ``hf://`` reference (see :mod:`mergeflow.sources`). A PEFT adapter
    reads as its whole fine-tuned model over ``base``, which it then needs."""
    from mergeflow.sources import resolve_checkpoint

    cache = cache or CheckpointCache()
    source = resolve_checkpoint(uri, cache)
    if source.kind == "lora":
        from mergeflow.lora import LoraReader, parse_adapter, read_adapter_config

        if base is None:
            raise CheckpointError(
                f"{source.uri}: is a LoRA adapter; reading it as a model needs the base model "
                "it adapts (give --base, or the spec's base)"
            )
        config_copy, weights = cache.fetch(source.adapter_config), source.weights_copy(cache)
        config = read_adapter_config(config_copy.path, source.uri)
        factors = open_file(weights)
        reader: CheckpointReader = LoraReader(parse_adapter(config, factors, source.uri), base)
        reader.files = (config_copy, weights)
    elif source.kind == "sharded":
        reader = _normalized(ShardedReader(source.weights_copy(cache), cache))
    else:
        copy = source.weights_copy(cache)
        reader = _normalized(open_file(copy))
        reader.files = (copy,)
    if source.folder is not None and source.kind != "lora":
        # errors name the file the user can find: inside the folder or hub reference given
        reader.name = f"{source.uri.rstrip('/')}/{os.path.basename(source.weights)}"
    reader.source = source
    return reader


@contextmanager
def open_checkpoints(
    finetuned: Sequence[str | os.PathLike],
    base: str | os.PathLike | None = None,
    cache: CheckpointCache | None = None,
) -> Iterator[tuple[CheckpointReader | None, list[CheckpointReader]]]:
    """Readers of the base (None without one) and of each fine-tuned checkpoint, closed on
    exit. PEFT adapters read over the base; adapters of different bases or target modules
    are refused."""
    from mergeflow.lora import check_compatible

    cache = cache or CheckpointCache()
    opened: list[CheckpointReader] = []
    try:
        base_reader = open_checkpoint(base, cache) if base is not None else None
        if base_reader is not None:
            opened.append(base_reader)
        readers = []
        for uri in finetuned:
            readers.append(open_checkpoint(uri, cache, base=base_reader))
            opened.append(readers[-1])
        adapters = lora_adapters(readers)
        if adapters:
            check_compatible(adapters)
        yield base_reader, readers
    finally:
        for reader in opened:
            reader.close()


def lora_adapters(readers: Sequence[CheckpointReader]) -> list:
    """The PEFT adapters among ``readers``."""
    return [r.adapter for r in readers if hasattr(r, "adapter")]


def load_state_dict(
    uri: str | os.PathLike,
    cache: CheckpointCache | None = None,
    base: CheckpointReader | None = None,
) -> StateDict:
    """Every tensor of the checkpoint at ``uri`` (an adapter's over ``base``)."""
    with open_checkpoint(uri, cache, base) as reader:
        return reader.to_state_dict()


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    uri: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``state`` as safetensors at ``uri``; the file appears whole or not at all."""
    tensors = {key: t.detach().contiguous().cpu() for key, t in state.items()}
    with staged_output(uri) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{uri}: cannot write safetensors ({exc})") from None


def read_formatted(
    uri: str | os.PathLike, fmt: str, what: str, cache: CheckpointCache | None = None
) -> tuple[dict[str, str], StateDict]:
    """Metadata and tensors of a mergeflow file whose metadata says ``format: fmt``; any
    other file is refused with an error that says what it is not."""
    with open_checkpoint(uri, cache) as reader:
        meta = reader.metadata()
        if meta.get("format") != fmt:
            raise CheckpointError(f"{uri}: not {what} (format {meta.get('format')!r})")
        return meta, reader.to_state_dict()


def load_for_compute(
    reader: CheckpointReader,
    key: str,
    device: torch.device,
    dtype: torch.dtype,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``key`` (or its ``rows``, start and stop along the first dimension) from ``reader``
    on ``device`` in ``dtype`` (float32 for merging), refused with an error naming the
    checkpoint and key when it holds NaN or Inf: a non-finite weight would spread through
    every merged tensor it touches, silently."""
    stored = reader.get(key) if rows is None else reader.get_rows(key, *rows)
    tensor = stored.to(device, dtype)
    # A NaN or Inf entry makes the sum non-finite, so a finite sum (one pass, no mask) clears
    # the tensor; a non-finite one (or a sum that overflowed) gets the entry-wise count.
    if not bool(torch.isfinite(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{reader.name}: key {key!r} holds {bad} NaN or Inf value(s) of {tensor.numel()}"
        )
    return tensor
