"""tlcore: transfer learning with one API on PyTorch, Keras (TensorFlow) and JAX (Flax NNX).

Importing tlcore imports no deep-learning framework; a backend imports its framework when first used.

Example:
    >>> import tlcore as tl                                                          # doctest: +SKIP
    >>> m = tl.zoo.create("small_cnn", backend="torch", pretrained="digits04")       # doctest: +SKIP
    >>> ft = tl.finetune(m, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(5))    # doctest: +SKIP
    >>> ft.fit(x, y, epochs=5, optimizer=tl.optim.AdamW(lr=1e-3))                    # doctest: +SKIP
"""
from __future__ import annotations

from . import optim, zoo
from .checkpoint import load
from .check import Snapshot, assert_frozen, changed_tensors, snapshot
from .cut import LayerCut
from .errors import (BackendNotFoundError, CheckpointError, CutError, DataError, FreezePolicyError,
                     FrozenWeightsChanged, LayerNotFoundError, OptimizerConfigError, TlcoreError,
                     UnsupportedModelError, ZooError)
from .finetune import finetune, wrap
from .freeze import FreezePolicy
from .head import Head, HeadError
from .model import FeatureCacheRefused, History, Model, Summary
from .registry import available_backends, get_backend

__version__ = "0.1.0"

__all__ = [
    "BackendNotFoundError", "CheckpointError", "CutError", "DataError", "FeatureCacheRefused",
    "FreezePolicy", "FreezePolicyError", "FrozenWeightsChanged", "Head", "HeadError", "History",
    "LayerCut", "LayerNotFoundError", "Model", "OptimizerConfigError", "Snapshot", "Summary",
    "TlcoreError", "UnsupportedModelError", "ZooError", "assert_frozen", "available_backends",
    "changed_tensors", "finetune", "get_backend", "load", "optim", "snapshot", "wrap", "zoo",
]
