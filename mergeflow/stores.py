"""Where a run keeps things, each a default a user can see and override.

=========================  ==========================================  =====================
variable                   default                                     what lives there
=========================  ==========================================  =====================
``MERGEFLOW_CACHE_DIR``    ``$XDG_CACHE_HOME/mergeflow`` or            fetched checkpoints,
                           ``~/.cache/mergeflow``                      local files' digests,
                                                                       prepared images,
                                                                       reports' charts
``MERGEFLOW_RESULT_STORE`` the cache folder                            factors, indexes,
                                                                       merges, scores
``MLFLOW_TRACKING_URI``    ``sqlite:///CACHE/mlflow.db``               runs, registry
``MERGEFLOW_ARTIFACT_ROOT`` ``CACHE/mlartifacts`` for a local tracking  models, charts,
                           store (a tracking server keeps its own)     results.json
=========================  ==========================================  =====================

:func:`use_defaults` puts the two MLflow defaults in the environment when they are unset,
so that nothing lands in the folder a command happens to run from (MLflow's own defaults
are ``./mlflow.db`` and ``./mlruns``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from mergeflow.results import STORE_VARIABLE
from mergeflow.storage import CheckpointCache

TRACKING_VARIABLE = "MLFLOW_TRACKING_URI"
ARTIFACT_VARIABLE = "MERGEFLOW_ARTIFACT_ROOT"


def is_local_tracking(uri: str) -> bool:
    """Whether the tracking store is a database or folder on this machine (not a server)."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


@dataclass(frozen=True)
class Stores:
    """The run's stores, as URIs or paths."""

    cache: str
    result_store: str
    tracking_uri: str
    artifact_root: str  # "the tracking server's" when a server keeps its own

    def line(self) -> str:
        return (
            f"stores: cache {self.cache}; results {self.result_store}; "
            f"tracking {self.tracking_uri}; artifacts {self.artifact_root}"
        )

    def record(self) -> dict[str, str]:
        return asdict(self)


def default_tracking_uri(cache: CheckpointCache) -> str:
    return f"sqlite:///{Path(cache.root).resolve() / 'mlflow.db'}"


def default_artifact_root(cache: CheckpointCache) -> str:
    return (Path(cache.root).resolve() / "mlartifacts").as_uri()


def use_defaults(cache_dir: str | None = None) -> Stores:
    """Set ``MLFLOW_TRACKING_URI`` and ``MERGEFLOW_ARTIFACT_ROOT`` to their defaults (see
    the module's table) where unset; the stores a run will use."""
    where = current(cache_dir)
    os.environ[TRACKING_VARIABLE] = where.tracking_uri
    if is_local_tracking(where.tracking_uri):
        os.environ[ARTIFACT_VARIABLE] = where.artifact_root
    return where


def current(cache_dir: str | None = None) -> Stores:
    """The stores as the environment names them now (nothing set, nothing created)."""
    cache = CheckpointCache(cache_dir)
    tracking = os.environ.get(TRACKING_VARIABLE) or default_tracking_uri(cache)
    artifacts = os.environ.get(ARTIFACT_VARIABLE) or (
        default_artifact_root(cache) if is_local_tracking(tracking) else "the tracking server's"
    )
    results = os.environ.get(STORE_VARIABLE) or str(cache.root)
    return Stores(str(cache.root), results, tracking, artifacts)
