"""Checkpoint readers and writers.

Readers give a checkpoint's layout (key → shape, dtype) without loading it and load one
tensor at a time, so a merge over T checkpoints holds the output plus a few tensors per
task, never T whole models. Formats, recognised by content rather than by file name:

- safetensors, read lazily through ``safe_open``;
- sharded safetensors, a ``*.safetensors.index.json`` whose ``weight_map`` names the shards;
- torch files, loaded with ``torch.load(weights_only=True)`` (memory-mapped when the file
  allows it) so no pickled code ever runs; a nested ``state_dict`` entry and ``module.``
  prefixes (DataParallel) are unwrapped.

Everything is written as safetensors.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import posixpath
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from mergeflow.errors import CheckpointError
from mergeflow.statedict import Layout, StateDict, layout_of
from mergeflow.storage import CheckpointCache, LocalCopy, staged_output

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
    """Lazy access to one checkpoint. ``name`` (its URI) appears in every error."""

    name: str
    sources: tuple[LocalCopy, ...] = ()

    @abstractmethod
    def layout(self) -> Layout:
        """Shape and dtype of every tensor, in the checkpoint's key order."""

    @abstractmethod
    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, on the CPU."""

    def keys(self) -> list[str]:
        return list(self.layout())

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
        buffer = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        done = 0
        while done < size:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise CheckpointError(f"{self.name}: file ended while reading tensor {key!r}")
            done += n
        return buffer.view(dtype).reshape(shape)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close


class ShardedSafetensorsReader(CheckpointReader):
    """A ``*.safetensors.index.json`` and the shards its ``weight_map`` names."""

    def __init__(self, index: LocalCopy, cache: CheckpointCache):
        self.name = index.uri
        try:
            weight_map = json.loads(index.path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{self.name}: not a safetensors index ({exc})") from None
        base = posixpath.dirname(index.uri)
        self._shards: dict[str, SafetensorsReader] = {}
        self._shard_of: dict[str, SafetensorsReader] = {}
        copies = [index]
        for key, shard_name in weight_map.items():
            if shard_name not in self._shards:
                copy = cache.fetch(posixpath.join(base, shard_name) if base else shard_name)
                copies.append(copy)
                self._shards[shard_name] = SafetensorsReader(copy.path, copy.uri)
            shard = self._shards[shard_name]
            if key not in shard.layout():
                raise CheckpointError(
                    f"{self.name}: {key!r} is mapped to {shard_name}, which lacks it"
                )
            self._shard_of[key] = shard
        self.sources = tuple(copies)

    def layout(self) -> Layout:
        return {key: shard.layout()[key] for key, shard in self._shard_of.items()}

    def get(self, key: str) -> torch.Tensor:
        if key not in self._shard_of:
            raise self._missing(key)
        return self._shard_of[key].get(key)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


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
            raise CheckpointError(
                f"{name}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        clean = key[len("module.") :] if key.startswith("module.") else key
        if clean in state:
            raise CheckpointError(f"{name}: key {clean!r} appears with and without 'module.'")
        state[clean] = value
    return state


def read_torch_file(path: str | os.PathLike, name: str) -> StateDict:
    """A torch checkpoint's state dict, without unpickling anything but tensors and containers."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        # torch's text suggests weights_only=False; name only what it blocked
        blocked = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", str(exc))
        what = f": it would import {next(g for g in blocked.groups() if g)}" if blocked else ""
        raise CheckpointError(
            f"{name}: refused to load: it holds objects other than tensors{what} "
            "(torch files are read with weights_only=True; no pickled code runs)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{name}: not a readable torch checkpoint ({exc})") from None
    return normalize_state_dict(obj, name)


def sniff_format(path: Path, name: str) -> str:
    """``"safetensors"``, ``"torch"`` or ``"index"``, from the file's first bytes."""
    if path.name.endswith(".index.json"):
        return "index"
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


def open_checkpoint(
    uri: str | os.PathLike, cache: CheckpointCache | None = None
) -> CheckpointReader:
    """A lazy reader for the checkpoint at ``uri`` (local path, ``file://`` or ``s3://``)."""
    cache = cache or CheckpointCache()
    copy = cache.fetch(uri)
    fmt = sniff_format(copy.path, copy.uri)
    if fmt == "index":
        return ShardedSafetensorsReader(copy, cache)
    if fmt == "safetensors":
        reader: CheckpointReader = SafetensorsReader(copy.path, copy.uri)
    else:
        reader = StateDictReader(read_torch_file(copy.path, copy.uri), copy.uri)
    reader.sources = (copy,)
    return reader


def load_state_dict(uri: str | os.PathLike, cache: CheckpointCache | None = None) -> StateDict:
    """Every tensor of the checkpoint at ``uri``."""
    with open_checkpoint(uri, cache) as reader:
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
    reader: CheckpointReader, key: str, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``key`` from ``reader`` on ``device`` in ``dtype`` (float32 for merging), refused with
    an error naming the checkpoint and key when it holds NaN or Inf: a non-finite weight
    would spread through every merged tensor it touches, silently."""
    tensor = reader.get(key).to(device, dtype)
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{reader.name}: key {key!r} holds {bad} NaN or Inf value(s) of {tensor.numel()}"
        )
    return tensor
