"""mergeflow: training-free model merging (CART and its peers) as a production pipeline.

The library is pure: state-dict algebra, merge methods, SVD factors, checkpoint I/O.
Orchestration (Prefect) lives in ``tasks/`` and ``flows/`` and imports this package, never
the other way round.
"""

from mergeflow.errors import CheckpointError, MergeflowError, ParameterError, StateDictMismatchError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "MergeflowError",
    "ParameterError",
    "StateDictMismatchError",
    "__version__",
]
