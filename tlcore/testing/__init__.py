"""The conformance kit: the checks every backend must pass, public so a third-party backend can run
them too. In a test folder::

    # conftest.py
    from tlcore.testing.fixtures import backend  # noqa: F401  (parametrized over TLCORE_TEST_BACKENDS)

    # test_conformance.py
    from tlcore.testing.suite_freeze import *   # noqa: F401,F403
    from tlcore.testing.suite_api import *      # noqa: F401,F403
    from tlcore.testing.suite_errors import *   # noqa: F401,F403

Example:
    >>> from tlcore.testing import reference_finetune, sample_data   # doctest: +SKIP
    >>> ft = reference_finetune("torch")                              # doctest: +SKIP
    >>> x, y = sample_data(ft)                                        # doctest: +SKIP
"""
from __future__ import annotations

import os

import numpy as np

import tlcore as tl

#: the reference network's layers (see ``Backend.reference_model``) and the part a finetune keeps
REFERENCE_LAYERS = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool", "dropout", "fc"]
BASE_LAYERS = ("conv1", "bn1", "conv2", "bn2")


def selected_backends() -> list[str]:
    """Backends to test: ``TLCORE_TEST_BACKENDS=torch,jax`` or, when unset, every installed one.

    A requested backend that is not installed is kept, so its tests fail loudly instead of vanishing.
    """
    env = os.environ.get("TLCORE_TEST_BACKENDS", "").strip()
    if not env:
        return tl.available_backends()
    return [name.strip() for name in env.split(",") if name.strip()]


def reference_finetune(backend: str, freeze: tl.FreezePolicy | None = None, seed: int = 0,
                       dropout: float = 0.1) -> tl.Model:
    """The reference model cut after ``relu2`` with an MLP head for 3 classes."""
    model = tl.get_backend(backend).reference_model(seed)
    return tl.finetune(model, cut=tl.LayerCut(at="relu2"),
                       head=tl.Head.mlp(hidden=(8,), num_classes=3, dropout=dropout),
                       freeze=freeze or tl.FreezePolicy.all(), seed=seed)


def sample_data(model: tl.Model, n: int = 48, num_classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs of the model's per-sample shape, with labels that depend on them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *model.input_shape)).astype(np.float32)
    y = (np.abs(x.reshape(n, -1)[:, :num_classes]).argmax(axis=1)).astype(np.int64)
    return x, y


def layer_of(name: str) -> str:
    """The top-level layer a tensor name belongs to (the part before the first dot)."""
    return name.split(".")[0]


def tensor_kinds(model: tl.Model) -> dict[str, str]:
    return {t.name: t.kind for t in model.tensors}
