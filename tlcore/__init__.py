"""tlcore: transfer learning with one API on PyTorch, Keras (TensorFlow) and JAX (Flax NNX).

``import tlcore`` imports no deep-learning framework, and not even numpy: public names are loaded on
first use (PEP 562), and a backend imports its framework only when first used.

Example:
    >>> import tlcore as tl                                                          # doctest: +SKIP
    >>> m = tl.zoo.create("small_cnn", backend="torch", pretrained="digits04")       # doctest: +SKIP
    >>> ft = tl.finetune(m, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(5))    # doctest: +SKIP
    >>> ft.fit(x, y, epochs=5, optimizer=tl.optim.AdamW(lr=1e-3))                    # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "BackendNotFoundError": "errors", "CheckpointError": "errors", "CutError": "errors", "DataError": "errors",
    "FreezePolicyError": "errors", "FrozenWeightsChanged": "errors", "LayerNotFoundError": "errors",
    "OptimizerConfigError": "errors", "TlcoreError": "errors", "UnsupportedModelError": "errors",
    "ZooError": "errors", "TrainingDiverged": "errors", "FitInProgressError": "errors", "ZooConfigError": "errors",
    "Snapshot": "check", "assert_frozen": "check", "changed_tensors": "check", "snapshot": "check",
    "LayerCut": "cut", "FreezePolicy": "freeze", "Head": "head", "HeadError": "head",
    "finetune": "workflow", "wrap": "workflow", "load": "workflow", "resume": "resumable",
    "FeatureCacheRefused": "model", "HeadNotBuiltError": "model", "History": "model", "Model": "model", "Summary": "model",
    "available_backends": "registry", "get_backend": "registry",
    "LayerGroups": "groups", "LayerDecay": "groups", "Discriminative": "groups",
    "UnfreezeSchedule": "recipes", "Adapter": "adapters", "load_adapter": "adapters", "AdapterError": "errors",
    "DistributedError": "errors",
}
_SUBMODULES = ("optim", "zoo", "testing", "datasets", "checkpoint", "data", "losses", "metrics", "sources",
               "schedules", "callbacks", "recipes", "adapters", "distribute")

__all__ = sorted([*_EXPORTS, "callbacks", "data", "distribute", "losses", "metrics", "optim", "recipes", "schedules",
                  "zoo"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'tlcore' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import callbacks, data, distribute, losses, metrics, optim, recipes, schedules, zoo  # noqa: F401
    from .groups import Discriminative, LayerDecay, LayerGroups  # noqa: F401
    from .recipes import UnfreezeSchedule  # noqa: F401
    from .adapters import Adapter, load_adapter  # noqa: F401
    from .errors import AdapterError, DistributedError  # noqa: F401
    from .check import Snapshot, assert_frozen, changed_tensors, snapshot  # noqa: F401
    from .cut import LayerCut  # noqa: F401
    from .errors import (BackendNotFoundError, CheckpointError, CutError, DataError,  # noqa: F401
                         FitInProgressError, FreezePolicyError, FrozenWeightsChanged, LayerNotFoundError,
                         OptimizerConfigError, TlcoreError, TrainingDiverged, UnsupportedModelError, ZooConfigError,
                         ZooError)
    from .resumable import resume  # noqa: F401
    from .workflow import finetune, load, wrap  # noqa: F401
    from .freeze import FreezePolicy  # noqa: F401
    from .head import Head, HeadError  # noqa: F401
    from .model import FeatureCacheRefused, HeadNotBuiltError, History, Model, Summary  # noqa: F401
    from .registry import available_backends, get_backend  # noqa: F401
