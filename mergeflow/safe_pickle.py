"""Read the tensors of a whole pickled module (``torch.save(model)``) without running its code.

The task-vectors line of work (Ilharco et al.; CART's and TALL masks' released checkpoints)
saves each fine-tuned model as a pickled ``ImageEncoder`` module, whose class lives in the
authors' ``src.modeling``. Loading such a file normally imports that code and runs whatever
the pickle names. Here the unpickler resolves only torch's own tensor and storage rebuild
functions (and a few inert containers: ``OrderedDict``, ``set``, ``torch.Size``, dtypes);
every other global becomes an inert stand-in class that records what the pickle asked of it
and never does anything. The module tree is then walked through the recorded ``__dict__``
states (``_parameters``, ``_buffers``, ``_modules``), collecting tensors under the names
``state_dict()`` would give them.

Only the zip format (``torch.save``'s default since 1.6) is read; TorchScript archives and
the legacy format are refused.
"""

from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import types
import zipfile
from collections.abc import Mapping

import torch

from mergeflow.errors import CheckpointError


class StandIn:
    """An object the pickle named but that was not imported: it records its constructor's
    arguments and its state, and has no behaviour at all."""

    __mergeflow_global__ = "?"

    def __new__(cls, *args, **kwargs):
        instance = object.__new__(cls)
        object.__setattr__(instance, "_standin", {"args": args, "kwargs": kwargs})
        return instance

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self._standin["state"] = state

    def __setitem__(self, key, value):
        self._standin.setdefault("items", {})[key] = value

    def append(self, value):
        self._standin.setdefault("list", []).append(value)

    def extend(self, values):
        self._standin.setdefault("list", []).extend(values)

    def __repr__(self) -> str:
        return f"<stand-in for {self.__mergeflow_global__}>"


def _stand_in(module: str, name: str) -> type:
    return type(name, (StandIn,), {"__mergeflow_global__": f"{module}.{name}"})


def _no_hooks(hooks):
    return collections.OrderedDict()


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, meta=None):
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, size, stride, False, _no_hooks(hooks)
    )


def _rebuild_tensor(storage, storage_offset, size, stride):
    return torch._utils._rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter whose data is not a tensor")
    return data.detach()


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS:
        raise pickle.UnpicklingError("a tensor rebuilt by a function other than torch's own")
    return func(*args)


_REBUILDERS = {_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter}

# What resolves to something real: torch's tensor rebuilders (wrapped so that no hook,
# subclass or attribute state from the file is applied) and inert containers.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
}
# (torch's own unpickler resolves typed storage names, FloatStorage & co., to inert markers
# before asking find_class; a raw UntypedStorage, which a pickle could ask to allocate at any
# size, stays a stand-in)


class StandInUnpickler(pickle.Unpickler):
    """An unpickler for which every global but :data:`_ALLOWED` (and torch's dtypes) is a
    :class:`StandIn`; torch adds its storage loading on top (``persistent_load``)."""

    def find_class(self, module: str, name: str):
        # protocol 2 (torch.save's) writes Python 2 names, e.g. __builtin__.set
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        key = (module, name)
        if key not in self.stand_ins:
            self.stand_ins[key] = _stand_in(module, name)
        return self.stand_ins[key]

    @property
    def stand_ins(self) -> dict:
        if not hasattr(self, "_stand_ins"):
            self._stand_ins: dict = {}
        return self._stand_ins


# what torch.load needs of a pickle module: an Unpickler class and a name
STAND_IN_PICKLE = types.SimpleNamespace(
    __name__="mergeflow.safe_pickle", Unpickler=StandInUnpickler
)


def _is_module(obj) -> bool:
    state = obj._standin.get("state") if isinstance(obj, StandIn) else None
    return isinstance(state, Mapping) and "_parameters" in state and "_modules" in state


def module_tensors(obj: StandIn, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors ``obj.state_dict()`` would hold, read from the recorded module states:
    parameters and persistent buffers of every submodule, named by their path."""
    state = obj._standin["state"]
    out: dict[str, torch.Tensor] = {}
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{prefix}{name}: is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not _is_module(child):
            raise CheckpointError(f"{prefix}{name}: a submodule mergeflow cannot read")
        out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def load_pickled_module(path: str | os.PathLike, name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of the module pickled at ``path`` and the qualified name of its class,
    with no pickled code run. Errors name ``name`` (the file's URI)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(
            f"{name}: refused: a pickled object in torch's legacy format (mergeflow reads "
            "whole pickled modules only in the zip format torch.save has written since 1.6)"
        ) from None
    if any(m.endswith(("/constants.pkl", "/code/")) or "/code/" in m for m in members):
        raise CheckpointError(f"{name}: refused: a TorchScript archive, not a checkpoint")
    try:
        root = torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=STAND_IN_PICKLE
        )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{name}: unreadable pickled checkpoint ({exc})") from None
    if isinstance(root, Mapping):
        return dict(root), "dict"
    if not _is_module(root):
        what = root.__mergeflow_global__ if isinstance(root, StandIn) else type(root).__name__
        raise CheckpointError(
            f"{name}: refused: it holds a {what} object, neither a state dict nor a module "
            "(nothing in it was run)"
        )
    try:
        return module_tensors(root), root.__mergeflow_global__
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
