"""Exceptions that carry a one-line reason naming the file, key or field at fault."""


class MergeflowError(Exception):
    """Base class for every error mergeflow raises on bad input."""


class StateDictMismatchError(MergeflowError, ValueError):
    """Two state dicts disagree on a key, a shape or a dtype."""


class CheckpointError(MergeflowError, OSError):
    """A checkpoint cannot be read, written or verified.

    ``transient`` marks failures that a retry may cure (a dropped connection, a truncated
    download); a missing object, a refused credential or a corrupt file is not transient.
    """

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class ParameterError(MergeflowError, ValueError):
    """A merge method was given an unknown or invalid parameter."""


class RegistrationError(MergeflowError, RuntimeError):
    """The model registry could not take a merged model; the message says where its weights
    were kept, so nothing computed is lost."""
