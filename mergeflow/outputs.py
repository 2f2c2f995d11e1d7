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
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mergeflow
from mergeflow.errors import CheckpointError, ParameterError
from mergeflow.sources import join
from mergeflow.storage import CheckpointCache, is_remote, local_path, staged_output

if TYPE_CHECKING:
    import torch

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


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


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


def shard(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split ``state`` in key order into shards of at most ``max_bytes`` (a larger tensor
    gets a shard of its own), as transformers does."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        n = _nbytes(tensor)
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += n
    return shards


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


def save_model_folder(
    state: Mapping[str, torch.Tensor],
    folder: str,
    recipe: Recipe,
    companions: Mapping[str, Path] | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    open_clip_config: Mapping | None = None,
) -> list[str]:
    """Write ``state`` as a model folder (see the module docstring); ``companions`` are
    files copied in (config, tokenizer). Returns the names written."""
    companions = dict(companions or {})
    if open_clip_config is not None or "open_clip_config.json" in companions:
        texts = {"README.md": recipe.card()}
        if open_clip_config is not None:
            texts["open_clip_config.json"] = json.dumps(open_clip_config, indent=2)
            companions.pop("open_clip_config.json", None)
        write_folder_files(
            folder, {"open_clip_model.safetensors": state}, texts, recipe.metadata(), companions
        )
        return ["open_clip_model.safetensors", *companions, *texts]
    shards = shard(state, parse_size(shard_size))
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {
        "metadata": {"total_size": sum(_nbytes(t) for t in state.values()), **recipe.metadata()},
        "weight_map": {key: name for name, part in zip(names, shards, strict=True) for key in part},
    }
    write_folder_files(
        folder,
        dict(zip(names, shards, strict=True)),
        {"model.safetensors.index.json": json.dumps(index, indent=2), "README.md": recipe.card()},
        recipe.metadata(),
        companions,
    )
    _remove_stale_shards(folder, set(names))
    return [*names, *companions, "model.safetensors.index.json", "README.md"]


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
