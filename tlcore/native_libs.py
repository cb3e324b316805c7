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
above. Loading ``libtriton.so`` with ``RTLD_DEEPBIND`` (so that it binds to its own LLVM) avoids it,
as does loading it before TensorFlow. :func:`guard_triton` installs an import hook that opens the
library with ``RTLD_DEEPBIND`` whenever it is first imported after TensorFlow, by tlcore or by the
user's own code; it costs nothing until then (a one-framework process never loads Triton for it).

Example:
    >>> from tlcore.native_libs import guard_triton
    >>> guard_triton() in ("guarded", "already loaded", "not installed")
    True
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

LIBTRITON = "triton._C.libtriton"


class _DeepBindLoader(importlib.abc.Loader):
    """Opens an extension module with ``RTLD_DEEPBIND`` while TensorFlow is in the process."""

    def __init__(self, loader: importlib.machinery.ExtensionFileLoader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        flags = sys.getdlopenflags()
        if "tensorflow" in sys.modules and hasattr(os, "RTLD_DEEPBIND"):
            sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
        try:
            return self.loader.create_module(spec)
        finally:
            sys.setdlopenflags(flags)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)


class _TritonGuard(importlib.abc.MetaPathFinder):
    """Finds ``triton._C.libtriton`` as the other finders do, and loads it with :class:`_DeepBindLoader`."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != LIBTRITON:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
                    spec.loader = _DeepBindLoader(spec.loader)
                return spec
        return None


def guard_triton() -> str:
    """Make every later import of Triton's native library safe next to TensorFlow.

    Returns ``"not installed"``, ``"already loaded"`` (it was loaded first: nothing to do) or
    ``"guarded"`` (the import hook is in place; installing it twice is a no-op).
    """
    if LIBTRITON in sys.modules:
        return "already loaded"
    try:
        if importlib.util.find_spec("triton") is None:
            return "not installed"
    except (ImportError, ValueError):
        return "not installed"
    if not any(isinstance(f, _TritonGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _TritonGuard())
    return "guarded"
