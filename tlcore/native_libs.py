"""Loading order of native libraries that crash a process when several frameworks share it.

With PyTorch's default (CUDA) wheels, ``torch._dynamo`` imports Triton, whose ``libtriton.so``
statically links its own LLVM. TensorFlow loads its libraries with ``RTLD_GLOBAL`` and exports
another LLVM's symbols. If TensorFlow is loaded first, the static initialisers of ``libtriton.so``
(``_GLOBAL__sub_I_PassBuilder.cpp`` registering ``llvm::DebugCounter`` entries) bind to
TensorFlow's LLVM singletons, whose layout differs, and ``free()`` a bad pointer: the process dies
with a segmentation fault. ``torch._dynamo`` is imported by a process's first ``torch.optim``
optimizer and by ``torchvision``, so ``tl.load(path, backend="keras")`` then a torch ``fit`` crashed.

Reproduced in a fresh venv with ``pip install torch==2.14.1 torchvision==0.29.1 tensorflow-cpu==2.21.*``:
``python -c "import tensorflow; import torch._dynamo"`` exits with signal 11; gdb shows the frames
above. Loading ``libtriton.so`` before TensorFlow, or after it with ``RTLD_DEEPBIND`` (so that it
binds to its own LLVM), avoids it. :func:`load_triton_first` does one or the other; the backends call
it only when the other framework is already in the process, so a one-framework process pays nothing.

Example:
    >>> from tlcore.native_libs import load_triton_first
    >>> load_triton_first() in ("loaded", "already loaded", "not installed")
    True
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

LIBTRITON = "triton._C.libtriton"


def load_triton_first() -> str:
    """Load Triton's native library now, in the one way that cannot crash later.

    Returns ``"not installed"``, ``"already loaded"`` or ``"loaded"``. When TensorFlow is already
    loaded, the library is opened with ``RTLD_DEEPBIND`` so that it resolves to its own symbols.
    """
    if LIBTRITON in sys.modules:
        return "already loaded"
    try:
        if importlib.util.find_spec("triton") is None:
            return "not installed"
    except (ImportError, ValueError):
        return "not installed"
    flags = sys.getdlopenflags()
    deep = "tensorflow" in sys.modules and hasattr(os, "RTLD_DEEPBIND")
    if deep:
        sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        importlib.import_module(LIBTRITON)
    except ImportError:
        return "not installed"  # a Triton without its native library (e.g. a CPU-only platform build)
    finally:
        sys.setdlopenflags(flags)
    return "loaded"
