"""The conformance kit: the checks every backend must pass, public so that a third-party backend can
run them too, with only its own framework installed (the references are numpy, see
:mod:`tlcore.testing.reference`). As scikit-learn's ``parametrize_with_checks``, one test runs them
all::

    # test_conformance.py of a package that ships a backend called "mybackend"
    from tlcore.testing import parametrize_with_checks

    @parametrize_with_checks(["mybackend"])
    def test_conformance(backend, check):
        check(backend)

Each check is a plain function of the backend name that raises on failure; :func:`all_checks` lists
them. A backend must provide ``Backend.reference_model(seed, variant)`` for the three variants (see
``tlcore.backend``) and the zoo's ``resnet18``.

Example:
    >>> from tlcore.testing import all_checks
    >>> names = [c.name for c in all_checks()]
    >>> "frozen_tensors_bit_identical[adamw_wd-all]" in names and "one_step_matches_numpy_reference[adam]" in names
    True
"""
from __future__ import annotations

import os

import numpy as np

import tlcore as tl

from ._kit import REGISTRY, Check

#: the sequential reference network's layers (see ``Backend.reference_model``) and the part a finetune keeps
REFERENCE_LAYERS = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool", "dropout", "fc"]
BASE_LAYERS = ("conv1", "bn1", "conv2", "bn2")
CHECK_MODULES = ("checks_api", "checks_freeze", "checks_modes", "checks_numerics", "checks_inputs", "checks_data",
                 "checks_recipes", "checks_errors", "checks_reliability", "checks_adapters")


def all_checks() -> list[Check]:
    """Every conformance check, in a stable order."""
    import importlib

    for name in CHECK_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    return list(REGISTRY)


def parametrize_with_checks(backends: list[str] | None = None):
    """A ``pytest.mark.parametrize`` over ``(backend, check)`` for every check and backend (default:
    :func:`selected_backends`), with ids ``"<backend>-<check>"``."""
    import pytest

    pairs = [(b, c) for b in (backends if backends is not None else selected_backends()) for c in all_checks()]
    return pytest.mark.parametrize("backend, check", pairs, ids=[f"{b}-{c.name}" for b, c in pairs])


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


def example_shape(model: tl.Model) -> tuple[int, ...]:
    """A per-sample input shape for ``model``: its own where fully known, else the zoo's default."""
    shape = model.input_shape
    if shape is not None and None not in shape:
        return tuple(shape)
    default = model.meta.get("default_input_shape")
    if default is None:
        raise ValueError(f"the input shape of {model!r} is not known; give one")
    return tuple(default)


def sample_data(model: tl.Model, n: int = 48, num_classes: int = 3, seed: int = 0,
                shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs of the model's per-sample shape and random labels; each class shifts its
    inputs' mean (class ``k`` by ``k - (num_classes - 1) / 2``), which any layout and any pooling
    keeps, so the task is learnable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n).astype(np.int64)
    shift = (y - (num_classes - 1) / 2).reshape(n, *[1] * len(shape or example_shape(model)))
    x = (rng.normal(size=(n, *(shape or example_shape(model)))) + shift).astype(np.float32)
    return x, y


def layer_of(name: str) -> str:
    """The top-level layer a tensor name belongs to (the part before the first dot)."""
    return name.split(".")[0]


def tensor_kinds(model: tl.Model) -> dict[str, str]:
    return {t.name: t.kind for t in model.tensors}


__all__ = ["BASE_LAYERS", "Check", "REFERENCE_LAYERS", "all_checks", "example_shape", "layer_of",
           "parametrize_with_checks", "reference_finetune", "sample_data", "selected_backends", "tensor_kinds"]
