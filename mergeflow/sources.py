"""Where a checkpoint's files are: a file, a model folder (local or ``s3://``), or a hub
reference.

A checkpoint URI names one of

- a file: safetensors, a torch file, or a sharded checkpoint's ``*.index.json``;
- a model folder, local or on an object store, laid out as Hugging Face and PEFT save them:
  ``model.safetensors``, ``model.safetensors.index.json`` (+ shards), ``pytorch_model.bin``
  (or its index), ``open_clip_model.safetensors``, or a PEFT adapter
  (``adapter_config.json`` + ``adapter_model.safetensors``);
- ``hf://ORG/NAME[@REVISION][/PATH]``: a Hugging Face hub repository, fetched through
  ``huggingface_hub`` into its own cache (``HF_HOME``/``HF_HUB_CACHE``; with
  ``HF_HUB_OFFLINE=1`` only what that cache holds) and then read as a folder.

:func:`resolve_checkpoint` turns the URI into a :class:`CheckpointSource`: which file to open
and in what role, and the folder its companions (``config.json``, tokenizer files) come
from. One shard of a sharded checkpoint given alone is refused, naming its index.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass, field, replace
from typing import Literal

from mergeflow.errors import CheckpointError
from mergeflow.storage import (
    CheckpointCache,
    LocalCopy,
    NotAFileError,
    file_sha256s,
    is_remote,
)

# What a model folder's weights may be called, in the order transformers looks for them
# (single file before index), then open_clip's hub names.
FOLDER_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Files of a model folder that are not weights but that a serving stack needs beside them;
# a merged folder gets them from the base's folder.
COMPANIONS = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "open_clip_config.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md"]
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<count>\d+)\.(?P<ext>safetensors|bin)$")
_HUB = re.compile(
    r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.+))?$"
)

Kind = Literal["file", "sharded", "lora"]


def join(folder: str, name: str) -> str:
    """``name`` inside ``folder`` (a local path or a URI)."""
    if is_remote(folder):
        return posixpath.join(folder.rstrip("/"), name)
    return os.path.join(folder, name)


def _name(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if is_remote(uri) else os.path.basename(uri)


def _parent(uri: str) -> str:
    return posixpath.dirname(uri.rstrip("/")) if is_remote(uri) else os.path.dirname(uri) or "."


@dataclass(frozen=True)
class CheckpointSource:
    """A resolved checkpoint URI.

    ``weights`` is the file to open: the checkpoint file itself, a sharded checkpoint's
    index, or (``kind == "lora"``) a PEFT adapter's weights, whose ``adapter_config`` says how
    to scale them. ``folder`` is where companion files live when the checkpoint was given as
    a folder or hub reference (None for a bare file); ``files`` lists that folder.
    """

    uri: str
    kind: Kind
    weights: str
    folder: str | None = None
    files: tuple[str, ...] = ()
    adapter_config: str | None = None
    fetched: LocalCopy | None = field(default=None, compare=False, repr=False)
    """the weights file's local copy, when resolving fetched it already"""

    def weights_copy(self, cache: CheckpointCache) -> LocalCopy:
        """The weights file's local copy (fetched once)."""
        return self.fetched or cache.fetch(self.weights)

    def companions(self) -> list[str]:
        """Names of the companion files (config, tokenizer, processor) in its folder."""
        return [name for name in COMPANIONS if name in self.files]

    def companion(self, name: str, cache: CheckpointCache) -> LocalCopy | None:
        """A local copy of companion ``name`` (e.g. ``config.json``), or None."""
        if self.folder is None or name not in self.files:
            return None
        return cache.fetch(join(self.folder, name))

    def weight_files(self, cache: CheckpointCache) -> list[LocalCopy]:
        """Local copies of every file the weights are read from (index and shards, or
        adapter config and weights), fetched through ``cache``."""
        copies = [self.weights_copy(cache)]
        if self.adapter_config:
            copies.insert(0, cache.fetch(self.adapter_config))
        if self.kind == "sharded":
            copies += [cache.fetch(join(_parent(self.weights), s)) for s in shard_names(copies[0])]
        return copies

    def digest(self, cache: CheckpointCache) -> str:
        """sha256 naming the weights' content: a single file's own sha256, else the digest
        of every file's name and sha256 (so moving a folder keeps its digest)."""
        return digest_of(self.weight_files(cache))


def shard_names(index: LocalCopy) -> list[str]:
    """The shard files a ``*.index.json`` maps tensors to, in first-use order."""
    try:
        weight_map = json.loads(index.path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index.uri}: not a sharded checkpoint index ({exc})") from None
    return list(dict.fromkeys(weight_map.values()))


def _listing(folder: str, cache: CheckpointCache) -> tuple[str, ...]:
    return tuple(cache.list_folder(folder))


def _from_folder(uri: str, folder: str, files: tuple[str, ...]) -> CheckpointSource:
    if ADAPTER_CONFIG in files:
        weights = next((w for w in ADAPTER_WEIGHTS if w in files), None)
        if weights is None:
            raise CheckpointError(
                f"{uri}: has {ADAPTER_CONFIG} but no adapter weights "
                f"({' or '.join(ADAPTER_WEIGHTS)})"
            )
        return CheckpointSource(
            uri, "lora", join(folder, weights), folder, files, join(folder, ADAPTER_CONFIG)
        )
    for name in FOLDER_WEIGHTS:
        if name in files:
            kind: Kind = "sharded" if name.endswith(".index.json") else "file"
            return CheckpointSource(uri, kind, join(folder, name), folder, files)
    shown = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    raise CheckpointError(
        f"{uri}: a folder with no checkpoint mergeflow can read (looked for "
        f"{', '.join(FOLDER_WEIGHTS)} or a PEFT adapter; it holds: {shown or 'nothing'})"
    )


def _index_naming(folder: str, shard: str, files: tuple[str, ...], cache) -> str | None:
    for name in files:
        if name.endswith(".index.json"):
            try:
                if shard in shard_names(cache.fetch(join(folder, name))):
                    return join(folder, name)
            except CheckpointError:
                continue
    return None


def _from_file(uri: str, cache: CheckpointCache) -> CheckpointSource:
    name, folder = _name(uri), _parent(uri)
    if name.endswith(".index.json"):
        return CheckpointSource(uri, "sharded", uri)
    shard = _SHARD.match(name)
    # a local folder is listed cheaply; a remote one only when the name says it may matter
    listed = shard or name in ADAPTER_WEIGHTS or not is_remote(uri)
    files = _listing(folder, cache) if listed else ()
    index = _index_naming(folder, name, files, cache)
    if index is not None:
        raise CheckpointError(
            f"{uri}: is one shard of the sharded checkpoint {index}; give that index "
            "or its folder, not one shard (a part alone would be merged as a whole model)"
        )
    if shard:
        raise CheckpointError(
            f"{uri}: is shard {int(shard['index'])} of {int(shard['count'])} of a sharded "
            f"checkpoint and no *.index.json beside it names it; give the whole checkpoint"
        )
    if name in ADAPTER_WEIGHTS and ADAPTER_CONFIG in files:
        return CheckpointSource(uri, "lora", uri, folder, files, join(folder, ADAPTER_CONFIG))
    return CheckpointSource(uri, "file", uri)


def hub_snapshot(uri: str, patterns: list[str] | None = None) -> str:
    """The local path ``hf://ORG/NAME[@REVISION][/PATH]`` stands for: the repository's
    snapshot fetched through ``huggingface_hub`` (its cache and token; offline under
    ``HF_HUB_OFFLINE=1``), joined with PATH. ``patterns`` limits the files fetched (by
    default: weights in safetensors, else torch files, and their companions)."""
    match = _HUB.match(uri)
    if match is None:
        raise CheckpointError(f"{uri}: a hub reference is hf://ORG/NAME[@REVISION][/PATH]")
    repo, revision, path = match["repo"], match["revision"], match["path"]
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - a dependency of the project
        raise CheckpointError(f"{uri}: hf:// needs huggingface_hub installed") from None

    def download(patterns: list[str] | None) -> str:
        try:
            return snapshot_download(repo, revision=revision, allow_patterns=patterns)
        except (RepositoryNotFoundError, GatedRepoError) as exc:
            raise CheckpointError(
                f"{uri}: no such hub repository, or no access ({type(exc).__name__})"
            ) from None
        except RevisionNotFoundError:
            raise CheckpointError(f"{uri}: revision {revision!r} not found") from None
        except LocalEntryNotFoundError:
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
            why = "HF_HUB_OFFLINE is set and the" if offline else "the hub is unreachable and the"
            raise CheckpointError(
                f"{uri}: {why} local hub cache holds no snapshot of {repo}"
                + (f"@{revision}" if revision else ""),
                transient=not offline,
            ) from None
        except OSError as exc:
            raise CheckpointError(f"{uri}: hub download failed ({exc})", transient=True) from None

    if patterns is not None:
        snapshot = download(patterns)
        return os.path.join(snapshot, path) if path else snapshot
    patterns = None if path else HUB_PATTERNS
    snapshot = download(patterns)
    if patterns and not any(
        os.path.exists(os.path.join(snapshot, w)) for w in FOLDER_WEIGHTS + ADAPTER_WEIGHTS
    ):
        snapshot = download(patterns + ["*.bin"])  # a repository with torch weights only
    return os.path.join(snapshot, path) if path else snapshot


def resolve_checkpoint(uri: str | os.PathLike, cache: CheckpointCache) -> CheckpointSource:
    """What the checkpoint at ``uri`` is and which file holds its weights."""
    uri = str(uri)
    if uri.startswith("hf://"):
        local = hub_snapshot(uri)
        if os.path.isdir(local):
            return _rename(_from_folder(uri, local, _listing(local, cache)), uri)
        if not os.path.isfile(local):
            raise CheckpointError(f"{uri}: the hub snapshot has no {os.path.basename(local)}")
        return _rename(_from_file(local, cache), uri)
    try:
        copy = cache.fetch(uri)
    except NotAFileError:
        return _from_folder(uri, uri, _listing(uri, cache))
    source = _from_file(uri, cache)
    return replace(source, fetched=copy) if source.weights == uri else source


def _rename(source: CheckpointSource, uri: str) -> CheckpointSource:
    return replace(source, uri=uri)


def source_digests(sources: list[CheckpointSource], cache: CheckpointCache) -> list[str]:
    """Each source's :meth:`~CheckpointSource.digest`, the local files among them hashed
    in parallel first (see :func:`~mergeflow.storage.file_sha256s`)."""
    files = [s.weight_files(cache) for s in sources]  # one fetch (an S3 HEAD) per file
    file_sha256s([c.path for copies in files for c in copies if c.sha256 is None])
    return [digest_of(copies) for copies in files]  # the hashes remembered just above


def digest_of(copies: list[LocalCopy]) -> str:
    """A single file's own sha256, else the digest of every file's name and sha256."""
    if len(copies) == 1:
        return copies[0].digest()
    parts = [[_name(c.uri), c.digest()] for c in copies]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def checkpoint_digest(uri: str | os.PathLike, cache: CheckpointCache) -> str:
    """sha256 of the checkpoint at ``uri`` (see :meth:`CheckpointSource.digest`)."""
    return resolve_checkpoint(uri, cache).digest(cache)
