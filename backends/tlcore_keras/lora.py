"""LoRA adapters on Keras ``Dense`` layers, in place: the Keras side of ``tlcore.adapters``.

An adapted layer keeps its object, name, place in the graph and weights; its class is switched to
:class:`LoraDense` (a ``Dense`` subclass; for a subclass of ``Dense``, a class made from both), which
turns on **Keras' own LoRA**, ``Dense.enable_lora``: two float32 variables ``lora_kernel_a``
(in, rank) and ``lora_kernel_b`` (rank, out) on the layer, the base kernel made non-trainable, and a
``kernel`` property computing ``kernel + (lora_alpha / rank) * lora_kernel_a @ lora_kernel_b``, which
``Dense.call`` multiplies the input with. ``state()`` reports the two as ``<layer>.lora_A``
(rank, in) and ``<layer>.lora_B`` (out, rank), their transposes (:data:`STATE_NAMES`; ``freeze``
names them so for every Dense), so ``x @ (W + s * A.T @ B.T) = x @ W + s * (x @ A.T) @ B.T`` is
tlcore's (and PEFT's) formula. With ``B = 0`` the merged kernel is ``W + 0``, bit for bit ``W``.

What :class:`LoraDense` adds to Keras' own LoRA:

* the scale survives a copy: Keras 3's ``Dense.build`` re-enables LoRA with ``lora_alpha = rank``,
  so a layer re-created from its config (what a cut's copy does) would change its scale;
  :class:`LoraDense` keeps ``lora_alpha`` (``scale * rank``) and ``lora_dropout`` in its config.
* dropout on the adapter's input (PEFT's ``lora_dropout``), which a merged kernel cannot express:
  while training with a rate above 0 the layer computes ``x @ W + b + s * (drop(x) @ a) @ b`` (then
  its activation) itself, with its own ``SeedGenerator`` (a ``state()`` tensor
  ``<layer>.lora_dropout_seed`` of kind ``rng``, reseeded by tlcore like a Dropout layer's);
  at inference it runs Keras' merged path, the same as without dropout.
* :func:`remove_lora` (Keras has no ``disable_lora``): the variables are deleted (Keras untracks
  them) and the layer gets its own class back.

The trainable flags are tlcore's: ``enable_lora`` sets the kernel's ``trainable`` to False, and the
core applies its freeze policy right after :func:`add_lora` (``freeze.apply_mask`` sets every flag).

Not adapted (left out of :func:`targets`): ``EinsumDense`` (MultiHeadAttention's projections),
quantized Dense layers and Dense layers with a kernel constraint (Keras refuses LoRA on those).

Example:
    >>> net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])        # doctest: +SKIP
    >>> add_lora(net.layers[0], 2.0, 0.0, np.ones((2, 4), np.float32), np.zeros((3, 2), np.float32))  # doctest: +SKIP
    >>> type(net.layers[0]).__name__, [v.name for v in net.layers[0].trainable_variables]  # doctest: +SKIP
    ('LoraDense', ['bias', 'lora_kernel_a', 'lora_kernel_b'])
    >>> remove_lora(net.layers[0]); type(net.layers[0]).__name__                            # doctest: +SKIP
    'Dense'
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tlcore.adapters import LoraTarget
from tlcore.cut import in_layer
from tlcore.errors import UnsupportedModelError

from ._keras import dense_kernel, keras, unlocked_tracker, untrack

#: Keras' LoRA variable names -> ``state()`` names; both are reported transposed (axes (1, 0))
STATE_NAMES = {"lora_kernel_a": "lora_A", "lora_kernel_b": "lora_B"}
#: the attribute holding the adapter dropout's seed generator, and its state's ``state()`` name
SEED_ATTR, SEED_NAME = "lora_seed_generator", "lora_dropout_seed"

ops = keras.ops


@keras.saving.register_keras_serializable(package="tlcore")
class LoraDense(keras.layers.Dense):
    """Keras' ``Dense`` with its own LoRA enabled (``enable_lora``), a scale that survives
    ``get_config``/``from_config`` and an optional dropout on the adapter's input (see the module).

    Layers become one in place (:func:`add_lora`); one built from a config (a copy) re-creates its
    adapter with Keras' initial values, which the copy then overwrites.

    Example:
        >>> layer = LoraDense(3, lora_rank=2, lora_alpha=4.0, lora_dropout=0.1)   # doctest: +SKIP
        >>> layer.build((None, 4)); layer.lora_scale                               # doctest: +SKIP
        2.0
    """

    def __init__(self, *args: Any, lora_dropout: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lora_dropout = float(lora_dropout)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def build(self, input_shape) -> None:
        alpha = self.lora_alpha
        super().build(input_shape)  # enables LoRA with lora_alpha = rank (Keras 3.15) ...
        if self.lora_enabled:
            self.lora_alpha = alpha  # ... so the config's alpha is put back
            if self.lora_dropout > 0:
                _add_seed_generator(self)

    def call(self, inputs, training=None):
        if not (training and self.lora_enabled and self.lora_dropout > 0):
            return super().call(inputs, training=training)  # Keras' merged kernel
        out = ops.matmul(inputs, dense_kernel(self))
        if self.bias is not None:
            out = ops.add(out, self.bias)
        dropped = keras.random.dropout(inputs, self.lora_dropout, seed=getattr(self, SEED_ATTR))
        delta = ops.matmul(ops.matmul(dropped, self.lora_kernel_a), self.lora_kernel_b)
        out = ops.add(out, ops.cast(self.lora_scale * delta, out.dtype))
        return self.activation(out) if self.activation is not None else out

    def get_config(self) -> dict:
        return {**super().get_config(), "lora_dropout": self.lora_dropout}


def state_name(layer: keras.layers.Layer, variable: Any) -> tuple[str, tuple[int, ...] | None] | None:
    """``(state() leaf name, axes permutation)`` of an adapter variable of ``layer`` (None for any
    other): ``lora_A`` / ``lora_B`` transposed from Keras' layouts, and ``lora_dropout_seed`` for the
    dropout's seed state.

    Example:
        >>> state_name(layer, layer.lora_kernel_a)   # doctest: +SKIP
        ('lora_A', (1, 0))
    """
    if not isinstance(layer, keras.layers.Dense):
        return None
    if variable.name in STATE_NAMES and variable is getattr(layer, variable.name, None):
        return STATE_NAMES[variable.name], (1, 0)
    generator = getattr(layer, SEED_ATTR, None)
    if generator is not None and variable is generator.state:
        return SEED_NAME, None
    return None


def _add_seed_generator(layer: keras.layers.Dense) -> None:
    with unlocked_tracker(layer):
        setattr(layer, SEED_ATTR, keras.random.SeedGenerator())


#: LoRA classes made for subclasses of Dense, by subclass
_CLASSES: dict[type, type] = {keras.layers.Dense: LoraDense}


def lora_class(cls: type) -> type:
    """The adapted class for a ``Dense`` class: :class:`LoraDense`, or for a subclass a class deriving
    from both (its own ``call`` still runs at inference and without dropout).

    Example:
        >>> lora_class(keras.layers.Dense) is LoraDense   # doctest: +SKIP
        True
    """
    if issubclass(cls, LoraDense):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Lora{cls.__name__}", (LoraDense, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def base_class(cls: type) -> type:
    """The class a :func:`lora_class` was made for (``Dense`` for :class:`LoraDense`)."""
    return next(c for c in cls.__mro__[1:] if not issubclass(c, LoraDense))


def is_adapted(layer: keras.layers.Layer) -> bool:
    """True when ``layer`` carries a LoRA adapter (tlcore's or Keras' own ``enable_lora``)."""
    return isinstance(layer, keras.layers.Dense) and bool(getattr(layer, "lora_enabled", False))


def why_not(layer: keras.layers.Layer) -> str | None:
    """Why LoRA cannot adapt ``layer`` (None: it can).

    Example:
        >>> why_not(keras.layers.Dense(2, kernel_constraint="non_neg"))   # doctest: +SKIP
        'it has a kernel constraint'
    """
    if not isinstance(layer, keras.layers.Dense):
        return f"it is a {type(layer).__name__}, not a keras.layers.Dense"
    if not layer.built:
        return "it is not built"
    if layer.quantization_mode is not None:
        return f"it is quantized ({layer.quantization_mode})"
    if layer.kernel_constraint is not None:
        return "it has a kernel constraint (Keras' LoRA refuses those)"
    return None


def targets(tensors: list, layers: list[tuple[str, Any]], head: str | None) -> list[LoraTarget]:
    """The :class:`LoraTarget` of every Dense layer LoRA can adapt among ``layers`` (``(path, layer)``
    in forward order), outside the layer ``head``; ``tensors`` are the model's ``freeze.Tensor``s,
    which give each kernel's ``state()`` name and layout.

    Example:
        >>> targets(m._tensors, freeze.named_layers(m.native), None)[0]   # doctest: +SKIP
        LoraTarget(module='dense', kernel='dense.kernel', in_features=4, out_features=3, transposed=True)
    """
    by_variable = {id(t.variable): t for t in tensors}
    out, seen = [], set()
    for path, layer in layers:
        if (head and in_layer(path, head)) or id(layer) in seen or why_not(layer) is not None:
            continue
        seen.add(id(layer))
        kernel = by_variable.get(id(dense_kernel(layer)))
        if kernel is None:
            continue
        n_in, n_out = dense_kernel(layer).shape
        out.append(LoraTarget(kernel.path, kernel.name, int(n_in), int(n_out), kernel.perm is None))
    return out


def _alpha(scale: float, rank: int) -> float:
    """``lora_alpha`` such that Keras' ``lora_alpha / rank`` is exactly ``scale`` (float64)."""
    alpha = float(scale) * rank
    for _ in range(4):
        if alpha / rank == scale:
            break
        alpha = float(np.nextafter(alpha, np.inf if alpha / rank < scale else -np.inf))
    return alpha


def add_lora(layer: keras.layers.Dense, scale: float, dropout: float, a: np.ndarray, b: np.ndarray) -> None:
    """Adapt ``layer`` in place: its pre-activation output becomes ``base(x) + scale * drop(x) @ a.T @ b.T``.

    ``a`` is (rank, in) and ``b`` (out, rank) (tlcore's layouts); Keras keeps them transposed.

    Example:
        >>> add_lora(layer, 2.0, 0.0, a, np.zeros((layer.units, a.shape[0]), np.float32))  # doctest: +SKIP
    """
    reason = why_not(layer)
    if reason is not None:
        raise UnsupportedModelError(f"cannot add a LoRA adapter to {layer.name!r}: {reason}")
    if is_adapted(layer):
        raise UnsupportedModelError(f"{layer.name!r} already has a LoRA adapter")
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    n_in, n_out = dense_kernel(layer).shape
    rank = a.shape[0]
    if a.shape != (rank, n_in) or b.shape != (n_out, rank) or rank < 1:
        raise ValueError(f"LoRA tensors for {layer.name!r} must be A ({rank}, {n_in}) and B ({n_out}, {rank}), "
                         f"got {a.shape} and {b.shape}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"the LoRA dropout rate must be in [0, 1), got {dropout}")
    object.__setattr__(layer, "__class__", lora_class(type(layer)))  # the graph keeps the same object
    layer.lora_dropout = float(dropout)
    layer.enable_lora(rank, lora_alpha=_alpha(scale, rank), a_initializer=keras.initializers.Zeros(),
                      b_initializer=keras.initializers.Zeros())
    layer.lora_kernel_a.assign(a.T)
    layer.lora_kernel_b.assign(b.T)
    if dropout > 0:
        _add_seed_generator(layer)


def remove_lora(layer: keras.layers.Dense) -> None:
    """Undo :func:`add_lora` in place: the adapter's variables (and seed generator) are deleted, the
    layer computes ``base(x)`` again with its own class; its kernel is trainable again (as before
    ``enable_lora``; the core applies its freeze policy after).

    Example:
        >>> remove_lora(layer); layer.lora_enabled   # doctest: +SKIP
        False
    """
    if not is_adapted(layer):
        raise UnsupportedModelError(f"{layer.name!r} has no LoRA adapter to remove")
    with unlocked_tracker(layer):
        del layer.lora_kernel_a  # Layer.__delattr__ untracks a variable
        del layer.lora_kernel_b
        generator = getattr(layer, SEED_ATTR, None)
        if generator is not None:
            untrack(layer, generator)
            delattr(layer, SEED_ATTR)
    layer.lora_enabled = False
    layer.lora_rank = layer.lora_alpha = None
    if isinstance(layer, LoraDense):
        del layer.lora_dropout
        object.__setattr__(layer, "__class__", base_class(type(layer)))
    dense_kernel(layer).trainable = layer.trainable
