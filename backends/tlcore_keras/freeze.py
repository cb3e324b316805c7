"""Naming every variable of a ``keras.Model`` and applying a resolved freeze mask to it.

Tensor names are the layer path and the variable name joined by dots (``conv1.kernel``,
``bn1.moving_mean``, ``block.a.bias``, ``head.out.kernel``); sub-layers of custom layers are named
after their ``name`` too (``mha.query.kernel``); the body of a cut or re-headed model without a
layer graph (``cut.Wrapper``) is left out, so the copy keeps the original's names. Kinds: ``BatchNormalization`` weights are
``bn_param`` (gamma, beta) and ``bn_stat`` (moving mean and variance); the states of
``SeedGenerator``s (Dropout and other random layers) are ``rng``; other weights created trainable
are ``param``, the rest ``buffer``. A Dense layer's LoRA variables (Keras' ``lora_kernel_a`` (in, rank),
``lora_kernel_b`` (rank, out)) are always reported as ``lora_A`` (rank, in) and ``lora_B`` (out, rank),
its adapter dropout's seed state as ``lora_dropout_seed`` (see ``lora.py``). Whether a weight was *created* trainable is read from the
layer's own lists, so a weight frozen by tlcore (or a copy of a frozen layer) keeps its kind.

Freezing is Keras' own ``trainable`` flag: frozen layers and weights get ``trainable=False``, and a
frozen ``BatchNormalization`` layer therefore runs in inference mode during training (Keras' BN
only uses batch statistics when ``training and self.trainable``).

Example:
    >>> [t.name for t in tensors(model, layer_paths(model))]    # doctest: +SKIP
    ['conv1.kernel', 'conv1.bias', 'bn1.gamma', 'bn1.beta', 'bn1.moving_mean', ...]
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlcore.cut import in_layer
from tlcore.freeze import Resolved, TensorInfo, owning_layer

from ._keras import keras, own_variables, seed_generators
from .cut import children, roots
from .lora import state_name as lora_state_name

BATCHNORM = (keras.layers.BatchNormalization,)
TRAINABLE_KINDS = ("param", "bn_param")


@dataclass(frozen=True)
class Tensor:
    """One variable of the model: its tensor name, the Keras variable, the path of the layer that
    owns it (``""``: the model itself), its :class:`tlcore.freeze.TensorInfo`, and ``perm``, the axes
    permutation from Keras' layout to the reported one (None: the same)."""

    name: str
    variable: Any
    path: str
    info: TensorInfo
    perm: tuple[int, ...] | None = None

    def read(self) -> np.ndarray:
        value = np.asarray(self.variable.numpy())
        return np.array(value.transpose(self.perm) if self.perm else value, copy=True, order="C")

    def write(self, value: np.ndarray) -> None:
        value = np.asarray(value)
        self.variable.assign(value.transpose(np.argsort(self.perm)) if self.perm else value)


#: PyTorch's names for Keras' weights, per layer type (canonical state of zoo models)
CANONICAL_NAMES = {
    keras.layers.BatchNormalization: {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                                      "moving_variance": "running_var"},
    keras.layers.LayerNormalization: {"gamma": "weight", "beta": "bias"},
    keras.layers.Conv2D: {"kernel": "weight"},
    keras.layers.Dense: {"kernel": "weight"},
}
#: Keras kernel layout -> PyTorch's: conv (kh, kw, in, out) -> (out, in, kh, kw); dense (in, out) -> (out, in)
CANONICAL_PERMS = {keras.layers.Conv2D: (3, 2, 0, 1), keras.layers.Dense: (1, 0)}


def canonical(layer: keras.layers.Layer, name: str) -> tuple[str, tuple[int, ...] | None]:
    """PyTorch's name and layout permutation for weight ``name`` of ``layer``."""
    for cls, names in CANONICAL_NAMES.items():
        if isinstance(layer, cls) and name in names:
            return names[name], CANONICAL_PERMS.get(cls) if name == "kernel" else None
    return name, None


def named_layers(layer: keras.layers.Layer, order: list | None = None, prefix: str = "") -> list[tuple[str, Any]]:
    """``(path, layer)`` for every layer below ``layer``, depth first, parents before children."""
    out = []
    for child in order if order is not None else children(layer):
        path = prefix + child.name
        out.append((path, child))
        out += named_layers(child, prefix=path + ".")
    return out


def _own_variables(layer: keras.layers.Layer) -> list[tuple[Any, str]]:
    """``(variable, kind)`` for the variables a layer creates itself (not its sub-layers')."""
    created_trainable, created_other = own_variables(layer)
    trainable = {id(v) for v in created_trainable}
    is_bn = isinstance(layer, BATCHNORM)
    out, seen = [], set()
    for v in created_trainable + created_other:
        if id(v) in seen:
            continue
        seen.add(id(v))
        if is_bn:
            kind = "bn_param" if id(v) in trainable else "bn_stat"
        else:
            kind = "param" if id(v) in trainable else "buffer"
        out.append((v, kind))
    out += [(sg.state, "rng") for sg in seed_generators(layer)]
    return out


def tensors(model: keras.Model, cut_points: list[str], order: list | None = None,
            canonical_at: Callable[[str], bool] = lambda path: False) -> list[Tensor]:
    """Every variable of ``model`` (trainable or not, random-seed states too), in forward order;
    under PyTorch's names and layouts for the layers whose path ``canonical_at`` accepts."""
    known = set(cut_points)
    out, seen, names = [], set(), set()
    for path, layer in [*(("", root) for root in roots(model)), *named_layers(model, order)]:
        owner = owning_layer(path, known)
        unit = path if isinstance(layer, BATCHNORM) else ""
        for v, kind in _own_variables(layer):
            if id(v) in seen:  # a variable shared by two layers is listed once, under the first
                continue
            seen.add(id(v))
            adapter = lora_state_name(layer, v)  # on every model, canonical or not
            if adapter is not None:
                leaf, perm = adapter
            else:
                leaf, perm = canonical(layer, v.name) if canonical_at(path) else (v.name, None)
            base = f"{path}.{leaf}" if path else leaf
            name, i = base, 1
            while name in names:
                name, i = f"{base}_{i}", i + 1
            names.add(name)
            out.append(Tensor(name, v, path, TensorInfo(name, owner, kind, unit), perm))
    return out


def set_trainable(layer: keras.layers.Layer, value: bool) -> None:
    """``layer.trainable = value``, always propagated to its sub-layers and weights.

    Plain assignment is skipped on the TensorFlow backend when the flag already has that value
    (``KerasAutoTrackable.__setattr__`` short-circuits ``self.x = self.x``), so a model that is
    already ``trainable=True`` would not re-enable a frozen sub-layer; call the property directly.
    """
    keras.layers.Layer.trainable.fset(layer, bool(value))


def apply_mask(model: keras.Model, all_tensors: list[Tensor], resolved: Resolved, order: list | None = None) -> None:
    """Set Keras' ``trainable`` flags so that exactly ``resolved.mask``'s tensors train.

    A layer whose tensors (its own and its sub-layers') are all frozen, and a BatchNorm layer in
    ``resolved.frozen_bn_units``, get ``trainable=False``; every weight gets ``trainable`` from the
    mask. The model itself stays ``trainable=True`` (Keras would propagate False to every layer).
    """
    mask = resolved.mask
    set_trainable(model, True)  # resets every layer and weight below
    movable = [t for t in all_tensors if t.info.kind in ("param", "bn_param", "bn_stat")]
    for path, layer in named_layers(model, order):
        if path in resolved.frozen_bn_units:
            set_trainable(layer, False)
            continue
        mine = [t for t in movable if in_layer(t.path, path)]
        if mine and not any(mask[t.name] for t in mine):
            set_trainable(layer, False)
    for t in all_tensors:
        if t.info.kind in TRAINABLE_KINDS:
            t.variable.trainable = mask[t.name]


def stochastic_layers(model: keras.Model, order: list | None = None) -> list[str]:
    """Paths of layers that draw random numbers (they own a ``SeedGenerator``: Dropout with rate > 0,
    noise and augmentation layers)."""
    found = [path for path, layer in [*(("", root) for root in roots(model)), *named_layers(model, order)]
             if seed_generators(layer)]
    return list(dict.fromkeys(found))
