"""The one place the torch backend imports PyTorch, after making a process that already loaded
TensorFlow safe for it (see :mod:`tlcore.native_libs`: Triton's LLVM must not bind to TensorFlow's).

Example:
    >>> from tlcore_torch._torch import torch, nn   # doctest: +SKIP
"""
from __future__ import annotations

import sys

from tlcore.native_libs import guard_triton

if "tensorflow" in sys.modules:
    guard_triton()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

__all__ = ["torch", "nn", "F"]
