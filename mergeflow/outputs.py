"""Merged models written the way serving stacks load them.

``--out x.safetensors`` is one safetensors file. ``--out DIR`` (a folder: a trailing ``/``, an
existing directory or a name without a file suffix) is a model folder:

- Hugging Face layouts: safetensors shards of at most ``shard_size`` bytes
  (``model-00001-of-00003.safetensors``, …) with ``model.safetensors.index.json``, as
  ``save_pretrained`` writes them, so ``AutoModel*.from_pretrained(DIR)`` loads it;
- open_clip models: ``open_clip_model.safetensors`` and ``open_clip_config.json``, what
  ``open_clip.create_model_and_transforms("local-dir:DIR")`` reads;

plus the base folder's ``config.json``, tokenizer and processor files, and a model card
(``README.md``) with the recipe and every source's sha256. Every file is written whole or
not at all, with the usual permissions (the umask's); the index comes after its shards.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

import mergeflow
from mergeflow.checkpoints import SAFETENSORS_DTYPES
from mergeflow.errors import CheckpointError, ParameterError
from mergeflow.sources import join
from mergeflow.statedict import Layout, TensorLayout, layout_of
from mergeflow.storage import CheckpointCache, is_remote, local_path, staged_output

_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

DEFAULT_SHARD_SIZE = "5GB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_OLD_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def parse_size(text: str | int) -> int:
    """Bytes from ``5GB`` (10⁹, as transformers counts), ``500MiB`` (2²⁰) or a plain number."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if match is None:
        raise ParameterError(f"shard size {text!r}: use a number with B, KB, MB, GB or MiB, GiB")
    size = int(float(match[1]) * _UNITS[(match[2] or "B").upper()])
    if size <= 0:
        raise ParameterError(f"shard size {text!r} must be positive")
    return size


def is_folder_output(out: str | os.PathLike) -> bool:
    """Whether ``out`` names a model folder rather than one safetensors file."""
    out = str(out)
    if out.endswith("/"):
        return True
    if not is_remote(out) and local_path(out).is_dir():
        return True
    return not os.path.splitext(out.rstrip("/"))[1]


def write_folder_files(
    folder: str,
    tensor_files: Mapping[str, Mapping[str, torch.Tensor]],
    text_files: Mapping[str, str],
    metadata: Mapping[str, str] | None = None,
    copies: Mapping[str, Path] | None = None,
) -> None:
    """Write safetensors files, then copied files, then text files into ``folder`` (each
    whole or not at all): the order makes an index or card appear after what it names."""
    from safetensors.torch import save_file

    for name, tensors in tensor_files.items():
        contiguous = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
        with staged_output(join(folder, name)) as tmp:
            save_file(contiguous, str(tmp), metadata={"format": "pt", **dict(metadata or {})})
    for name, source in (copies or {}).items():
        with staged_output(join(folder, name)) as tmp:
            tmp.write_bytes(Path(source).read_bytes())
    for name, text in text_files.items():
        with staged_output(join(folder, name)) as tmp:
            tmp.write_text(text)


def layout_bytes(entry: TensorLayout) -> int:
    """The bytes of one (shape, dtype) entry's data."""
    shape, dtype = entry
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def plan_shards(layout: Layout, max_bytes: int) -> list[list[str]]:
    """Split ``layout``'s keys in order into shards of at most ``max_bytes`` (a larger
    tensor gets a shard of its own), as transformers does."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, entry in layout.items():
        n = layout_bytes(entry)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def aligned_order(keys: Sequence[str], layout: Layout) -> list[str]:
    """``keys`` with wider dtypes first (stable), as safetensors orders a file: every tensor
    then starts at a multiple of its element size, so loaders can map it without a copy."""
    return sorted(keys, key=lambda k: -torch.empty((), dtype=layout[k][1]).element_size())


class SafetensorsStream:
    """One safetensors file written tensor by tensor, in a planned order, to a staged path.

    The header (every key's dtype, shape and offsets) is written first from the planned
    ``layout``; :meth:`write` then appends each tensor's bytes as it arrives and refuses one
    out of order or of another shape or dtype, so nothing but the tensor being written is
    held. The file is complete when every key is written; :class:`StreamedOutput` places it.
    """

    def __init__(self, path: Path, layout: Layout, metadata: Mapping[str, str] | None = None):
        self.path = path
        self.layout = layout
        self._pending = list(layout)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for key, (shape, dtype) in layout.items():
            if dtype not in _SAFETENSORS_NAMES:
                raise CheckpointError(
                    f"{path.name}: {key!r} is {dtype}, which safetensors cannot hold"
                )
            size = layout_bytes((shape, dtype))
            header[key] = {
                "dtype": _SAFETENSORS_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads
        self._file = open(path, "wb")  # noqa: SIM115 (closed by finish, or by the output)
        self._file.write(len(text).to_bytes(8, "little") + text)

    @property
    def complete(self) -> bool:
        return not self._pending

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if not self._pending or key != self._pending[0]:
            expected = self._pending[0] if self._pending else "nothing more"
            raise RuntimeError(f"{self.path.name}: got {key!r}, expected {expected!r}")
        shape, dtype = self.layout[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"{self.path.name}: {key!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"the header says {shape} {dtype}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._pending.pop(0)
        if not self._pending:
            self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class StreamedOutput:
    """Safetensors files (``files``: URI → its keys, in write order) written as a merge
    yields tensors: each tensor goes to its file at once, so the merge holds no output.
    Every file is staged, and all are placed (renamed or uploaded) only when the last is
    complete: a merge that fails half-way leaves nothing new at the targets (nor a mix of
    new and old shards)."""

    def __init__(
        self,
        files: Mapping[str, Sequence[str]],
        layout: Layout,
        metadata: Mapping[str, str] | None = None,
    ):
        self._plan = {uri: list(keys) for uri, keys in files.items()}
        self._file_of = {key: uri for uri, keys in self._plan.items() for key in keys}
        self._layout = layout
        self._metadata = dict(metadata or {})
        self._stack = ExitStack()
        self._open: SafetensorsStream | None = None
        self._done: list[str] = []

    def order(self) -> list[str]:
        """Every key, in the order :meth:`write` takes them."""
        return [key for keys in self._plan.values() for key in keys]

    def __enter__(self) -> StreamedOutput:
        self._stack.__enter__()
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self._file_of:
            raise RuntimeError(f"{key!r} is in no planned output file")
        if self._open is None:
            uri = self._file_of[key]
            path = self._stack.enter_context(staged_output(uri))
            layout = {k: self._layout[k] for k in self._plan[uri]}
            self._open = SafetensorsStream(path, layout, self._metadata)
            self._stack.callback(self._open.close)
        self._open.write(key, tensor)
        if self._open.complete:
            self._done.append(self._file_of[key])
            self._open = None

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is None and len(self._done) != len(self._plan):
            missing = next(uri for uri in self._plan if uri not in self._done)
            error = RuntimeError(f"{missing}: not every tensor was written")
            self._stack.__exit__(RuntimeError, error, None)  # the staged files are removed
            raise error
        return self._stack.__exit__(kind, value, traceback)


@dataclass(frozen=True)
class Recipe:
    """What a merged model was made from and how, for its model card and metadata."""

    method: str
    params: Mapping[str, object]
    base: tuple[str, str] | None  # (uri, sha256)
    finetuned: Sequence[tuple[str, str]]
    library: str = "transformers"

    def card(self, title: str = "Merged model") -> str:
        shown = {k: v for k, v in self.params.items() if v is not None}
        settings = ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"
        front = ["---", f"library_name: {self.library}"]
        if self.base:
            front.append(f"base_model: {json.dumps(self.base[0])}")
        front += ["tags:", "- merge", "- mergeflow", f"- {self.method}", "---", ""]
        rows = ([("base", *self.base)] if self.base else []) + [
            (f"fine-tuned {i}", uri, digest) for i, (uri, digest) in enumerate(self.finetuned)
        ]
        body = [
            f"# {title}",
            "",
            f"Merged by mergeflow {mergeflow.__version__} with `{self.method}` ({settings}) "
            f"from {len(self.finetuned)} fine-tuned checkpoints.",
            "",
            "| role | source | sha256 |",
            "|---|---|---|",
            *[f"| {role} | `{uri}` | `{digest}` |" for role, uri, digest in rows],
            "",
        ]
        return "\n".join(front + body)

    def metadata(self) -> dict[str, str]:
        return {
            "mergeflow.version": mergeflow.__version__,
            "mergeflow.method": self.method,
            "mergeflow.params": json.dumps(dict(self.params), sort_keys=True, default=str),
        }


def _remove_stale_shards(folder: str, keep: set[str]) -> None:
    """A folder written before with more shards keeps none of the old ones (local only)."""
    if is_remote(folder) or not local_path(folder).is_dir():
        return
    for path in local_path(folder).iterdir():
        if _OLD_SHARD.match(path.name) and path.name not in keep:
            path.unlink()


def _refuse_unsharded_weights(folder: str) -> None:
    """``from_pretrained`` loads ``model.safetensors`` before any index, so new shards beside
    one would be read as that old model: refused before anything is merged (local only)."""
    if is_remote(folder):
        return
    stale = local_path(folder) / "model.safetensors"
    if stale.exists():
        raise CheckpointError(
            f"{stale}: from_pretrained would load this file instead of the merged shards; "
            "remove it or write to another folder"
        )


class ModelFolder:
    """A model folder (see the module docstring) written as a merge yields its tensors:
    plan it from the output's ``layout``, write every key of :meth:`order` through
    :meth:`write`; on leaving the ``with`` block the tensor files are placed, then the
    companions (config, tokenizer), then the index and the model card, so an index never
    names a shard that is not there. ``names`` lists what was written."""

    def __init__(
        self,
        folder: str,
        layout: Layout,
        recipe: Recipe,
        companions: Mapping[str, Path] | None = None,
        shard_size: int | str = DEFAULT_SHARD_SIZE,
        open_clip_config: Mapping | None = None,
    ):
        self.folder = folder
        self._companions = dict(companions or {})
        self._texts = {"README.md": recipe.card()}
        metadata = {"format": "pt", **recipe.metadata()}
        if open_clip_config is not None or "open_clip_config.json" in self._companions:
            if open_clip_config is not None:
                self._texts["open_clip_config.json"] = json.dumps(open_clip_config, indent=2)
                self._companions.pop("open_clip_config.json", None)
            files = {"open_clip_model.safetensors": aligned_order(list(layout), layout)}
        else:
            _refuse_unsharded_weights(folder)
            shards = plan_shards(layout, parse_size(shard_size))
            files = {
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": aligned_order(keys, layout)
                for i, keys in enumerate(shards)
            }
            index = {
                "metadata": {
                    "total_size": sum(layout_bytes(e) for e in layout.values()),
                    **recipe.metadata(),
                },
                "weight_map": {key: name for name, keys in files.items() for key in keys},
            }
            self._texts = {
                "model.safetensors.index.json": json.dumps(index, indent=2),
                **self._texts,
            }
        self._tensor_files = list(files)
        self._output = StreamedOutput(
            {join(folder, name): keys for name, keys in files.items()}, layout, metadata
        )
        self.names = [*self._tensor_files, *self._companions, *self._texts]

    def order(self) -> list[str]:
        return self._output.order()

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._output.write(key, tensor)

    def __enter__(self) -> ModelFolder:
        self._output.__enter__()
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        if self._output.__exit__(kind, value, traceback) or kind is not None:
            return False
        write_folder_files(self.folder, {}, self._texts, None, self._companions)
        if not self._tensor_files[0].startswith("open_clip"):
            _remove_stale_shards(self.folder, set(self._tensor_files))
        return False


def save_model_folder(
    state: Mapping[str, torch.Tensor],
    folder: str,
    recipe: Recipe,
    companions: Mapping[str, Path] | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    open_clip_config: Mapping | None = None,
) -> list[str]:
    """Write an in-memory ``state`` as a model folder (see :class:`ModelFolder`); returns
    the names written."""
    writer = ModelFolder(folder, layout_of(state), recipe, companions, shard_size, open_clip_config)
    with writer:
        for key in writer.order():
            writer.write(key, state[key])
    return writer.names


def companion_files(source, cache: CheckpointCache) -> dict[str, Path]:
    """The companion files (config, tokenizer, processor) of a checkpoint source's folder,
    as local copies by name; none for a bare file."""
    if source is None:
        return {}
    out = {}
    for name in source.companions():
        copy = source.companion(name, cache)
        if copy is None:
            raise CheckpointError(f"{source.uri}: lost {name} while reading it")
        out[name] = copy.path
    return out
