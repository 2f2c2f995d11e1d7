"""Results kept by content, shared between runs and workers.

Every costly product of a pipeline run (CART factors, CART indexes, data-aware merges,
scores) is named by a digest of what it was computed from, so a re-run of the same spec
finds each one instead of recomputing it, and a run killed halfway resumes from what it
had finished. The store lives at ``$MERGEFLOW_RESULT_STORE`` (``s3://bucket/prefix`` so that
ephemeral workers share it, or a local folder); without it, under the local cache. Files
are written whole or not at all (staged, then renamed or uploaded) and read back through
the verified checkpoint cache; Prefect's database holds none of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from mergeflow.errors import CheckpointError
from mergeflow.storage import (
    CheckpointCache,
    atomic_write_bytes,
    filesystem,
    is_remote,
    local_path,
    staged_output,
)

log = logging.getLogger(__name__)

STORE_VARIABLE = "MERGEFLOW_RESULT_STORE"


class StoreUsage:
    """Which results this process found in a store and which it made, by kind, from a
    point on (:meth:`mark`): each (kind, name) counted once, as computed if it was made
    since then, else as reused. In-process: a run whose steps run in other processes (Dask
    workers) sees only its own."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: list[tuple[str, str, bool]] = []  # (kind, name, computed)

    def reused(self, kind: str, name: str) -> None:
        with self._lock:
            self._events.append((kind, name, False))

    def computed(self, kind: str, name: str) -> None:
        with self._lock:
            self._events.append((kind, name, True))

    def mark(self) -> int:
        with self._lock:
            return len(self._events)

    def since(self, mark: int) -> dict[str, dict[str, int]]:
        """``{kind: {"reused": n, "computed": m}}`` of the results used after ``mark``."""
        with self._lock:
            events = self._events[mark:]
        made: dict[tuple[str, str], bool] = {}
        for kind, name, computed in events:
            made[(kind, name)] = made.get((kind, name), False) or computed
        counts: dict[str, dict[str, int]] = {}
        for (kind, _), computed in made.items():
            counts.setdefault(kind, {"reused": 0, "computed": 0})[
                "computed" if computed else "reused"
            ] += 1
        return dict(sorted(counts.items()))


USAGE = StoreUsage()


class ResultStore:
    """Content-keyed files and JSON records under ``root`` (a local folder or a URI)."""

    def __init__(self, cache: CheckpointCache, root: str | os.PathLike | None = None):
        self.cache = cache
        root = root if root is not None else os.environ.get(STORE_VARIABLE) or cache.root
        self.root = str(root).rstrip("/")
        self.remote = is_remote(self.root)

    def uri(self, kind: str, name: str) -> str:
        return f"{self.root}/{kind}/{name}"

    def _exists(self, uri: str) -> bool:
        if not self.remote:
            return local_path(uri).is_file()
        fs, path = filesystem(uri)
        fs.invalidate_cache(path)
        return fs.exists(path)

    def file(self, kind: str, name: str, build: Callable[[str], None]) -> str:
        """A local path of the file ``kind/name``: fetched when the store has it, else made
        by ``build(uri)`` (which must write the file at ``uri`` whole) and then fetched.

        Runs that share the store may make the same file at once. The first one stored
        wins: a run that finds the file there when its own is made keeps the stored one,
        and a fetch that loses its object to a concurrent write of the same content key
        fetches it again."""
        uri = self.uri(kind, name)
        if self._exists(uri):
            log.info("reusing %s", uri)
            USAGE.reused(kind, name)
        elif self.remote:
            with tempfile.TemporaryDirectory(prefix="mergeflow-result-") as tmp:
                staged = str(Path(tmp) / name)
                build(staged)
                USAGE.computed(kind, name)
                if self._exists(uri):
                    log.info("%s was stored meanwhile by another run; using that one", uri)
                else:
                    with staged_output(uri) as target:
                        shutil.copyfile(staged, target)
        else:
            build(uri)
            USAGE.computed(kind, name)
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                return str(self.cache.fetch(uri).path)
            except CheckpointError as exc:
                if not exc.transient or attempt == attempts:
                    raise
                log.warning("fetching %s again: %s", uri, exc)

    def has_file(self, kind: str, name: str) -> bool:
        return self._exists(self.uri(kind, name))

    def read_json(self, kind: str, key: str) -> dict | None:
        """The record ``kind/key.json``, or None when there is none (or it is unreadable)."""
        uri = self.uri(kind, f"{key}.json")
        try:
            if self.remote:
                fs, path = filesystem(uri)
                with fs.open(path, "rb") as f:
                    record = json.loads(f.read())
            else:
                record = json.loads(local_path(uri).read_text())
            USAGE.reused(kind, key)
            return record
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("ignoring unreadable record %s", uri)
            return None

    def write_json(self, kind: str, key: str, record: dict) -> None:
        uri = self.uri(kind, f"{key}.json")
        data = json.dumps(record, sort_keys=True).encode()
        USAGE.computed(kind, key)
        if not self.remote:
            atomic_write_bytes(local_path(uri), data)
            return
        with staged_output(uri) as tmp:
            Path(tmp).write_bytes(data)

    def records(self, kind: str) -> list[str]:
        """Keys of the records of ``kind`` (for tests and housekeeping)."""
        uri = f"{self.root}/{kind}"
        if not self.remote:
            folder = local_path(uri)
            return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        fs, path = filesystem(uri)
        fs.invalidate_cache(path)
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(Path(n).stem for n in names if n.endswith(".json"))
