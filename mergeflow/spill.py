"""A model-sized intermediate kept on disk, not in memory.

Methods whose every output tensor waits on a model-wide scalar known only after a full
pass (OPCM rescales the merged task vector to the tasks' mean norm) write each key's
intermediate here during that pass and read it back, key by key, when the merge streams.
The file is raw float32, appended key by key; what is read back is a copy (the file's pages
stay the page cache's to evict). It lives under ``$MERGEFLOW_CACHE_DIR/tmp`` (a checkpoint's
size, so not in a RAM-backed ``/tmp``) and is removed when the spill is closed or collected.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch

from mergeflow.storage import default_cache_dir


class TensorSpill:
    """Float32 tensors appended by key to one temporary file and read back by key."""

    def __init__(self, folder: str | os.PathLike | None = None):
        folder = Path(folder) if folder is not None else default_cache_dir() / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix="spill-", suffix=".f32")
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._where: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._size = 0
        self._finalizer = weakref.finalize(self, _remove, self._file, self.path)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def append(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._where:
            raise KeyError(f"{key!r} is already spilled")
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        self._file.write(memoryview(data.reshape(-1).numpy()))
        self._where[key] = (self._size, tuple(data.shape))
        self._size += data.numel() * 4

    def get(self, key: str) -> torch.Tensor:
        """A copy of the tensor spilled under ``key`` (float32, on the CPU)."""
        offset, shape = self._where[key]
        if not self._file.closed:
            self._file.flush()
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=torch.float32)
        view = np.memmap(self.path, np.float32, "r", offset, shape)
        return torch.from_numpy(np.array(view))

    def close(self) -> None:
        """Remove the file (also done when the spill is garbage-collected)."""
        self._finalizer()


def _remove(file, path: Path) -> None:
    file.close()
    path.unlink(missing_ok=True)
