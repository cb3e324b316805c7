"""``JaxModel``: an ``nnx.Module`` behind the :class:`tlcore.Model` API (its own input layout, NHWC
for convolutions).

Example:
    >>> import tlcore as tl                                                             # doctest: +SKIP
    >>> net = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 2, rngs=rngs))  # doctest: +SKIP
    >>> m = tl.wrap(net)                                                                 # doctest: +SKIP
    >>> m.layers, list(m.state())[:2]                                                   # doctest: +SKIP
    (['0', '1', '2'], ['0.bias', '0.kernel'])
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlcore.backend import Trainer
from tlcore.cut import in_layer
from tlcore.errors import CutError
from tlcore.freeze import Resolved, TensorInfo
from tlcore.head import HeadPlan
from tlcore.model import FEATURE_BATCH, Model
from tlcore.optim import TrainSpec

from .cut import _children, append_head, cut_module, layer_entries, static_width, trace_shapes
from .freeze import Layout, Partition, layout, partition, set_modes, stochastic_modules
from .head import build_head
from .layers import CanonicalConv, CanonicalLinear
from .train import JaxTrainer, _infer, infer_batches


def infer_input_shape(module: nnx.Module) -> tuple | None:
    """Per-sample input shape as far as the first leaf layer tells (None where unknown)."""
    node: Any = module
    while True:
        subs = [c for _, _, c in _children(node) if isinstance(c, nnx.Module)]
        if not subs:
            break
        node = subs[0]
    if isinstance(node, (nnx.Linear, CanonicalLinear)):
        return (node.in_features,)
    if isinstance(node, (nnx.Conv, CanonicalConv)):
        return (*(None,) * len(node.kernel_size), node.in_features)
    return None


def _to_numpy(value: Any) -> np.ndarray:
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    return np.array(value, copy=True)


class JaxModel(Model):
    """A Flax NNX module wrapped as a :class:`tlcore.Model`.

    Tensor names are the module paths joined by dots (``conv1.kernel``, ``bn1.mean``,
    ``dropout.rngs.count``); the children of an ``nnx.Sequential`` are ``0``, ``1``, ... The model
    shares the module: training it updates the module's variables (at the end of ``fit``).

    Args:
        module: the Flax NNX module.
        rng_prefix: the name of ``module`` inside a larger model whose RNG streams it shares (a head
            trained on cached features), so that its dropout keys are that model's.
        layer_order: the layers of the model this one was cut from, whose order it keeps.
        canonical: the module's variables have PyTorch's names and layouts (zoo models; an attached
            head always has them).
        **kwargs: ``input_shape``, ``head``, ``head_spec``, ``policy``, ``meta`` (see ``tlcore.Model``).

    Example:
        >>> m = tl.get_backend("jax").reference_model(seed=0)   # doctest: +SKIP
        >>> m.layers[:3]                                       # doctest: +SKIP
        ['conv1', 'bn1', 'relu1']
    """

    backend = "jax"

    def __init__(self, module: nnx.Module, *, rng_prefix: str = "", layer_order: list[str] | None = None,
                 canonical: bool = False, static_width: int | None = None, **kwargs: Any):
        if not isinstance(module, nnx.Module):
            raise TypeError(f"JaxModel wraps a flax.nnx.Module, got {type(module).__name__}")
        self._module = module
        self._static_width = static_width
        self._layout: Layout | None = None
        self._partition: Partition | None = None
        self.rng_prefix = rng_prefix
        self._layer_order = list(layer_order or ())
        self.canonical = canonical
        kwargs.setdefault("input_shape", infer_input_shape(module))
        super().__init__(**kwargs)

    @property
    def native(self) -> nnx.Module:
        return self._module

    @property
    def layout(self) -> Layout:
        """Names, kinds and native paths of the module's layers and variables."""
        if self._layout is None:
            self._layout = layout(self._module, self._layer_order)
        return self._layout

    def _layer_names(self) -> list[str]:
        return list(self.layout.layers)

    def _layer_kinds(self) -> dict[str, str]:
        return dict(self.layout.kinds)

    def _tensor_infos(self) -> list[TensorInfo]:
        return list(self.layout.infos)

    def _variables(self) -> dict[str, nnx.Variable]:
        flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(self._module))}
        missing = [n for n, p in self.layout.path_of.items() if p not in flat]
        if missing:
            raise CutError(f"the module's structure changed after it was wrapped (no variable {missing[0]!r}); "
                           "wrap it again with tl.wrap")
        return {n: flat[p] for n, p in self.layout.path_of.items()}

    def _read_state(self) -> dict[str, np.ndarray]:
        variables = self._variables()
        return {t.name: _to_numpy(variables[t.name].get_value()) for t in self.layout.infos}

    def _write_state(self, arrays: dict[str, np.ndarray]) -> None:
        variables = self._variables()
        for name, value in arrays.items():
            var = variables[name]
            old = var.get_value()
            if jnp.issubdtype(old.dtype, jax.dtypes.prng_key):
                new = jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(old))
            else:
                new = jnp.asarray(value, dtype=old.dtype)
            var.set_value(new)

    def _apply_freeze(self, resolved: Resolved) -> None:
        self._partition = partition(self.layout, resolved)
        self._prepared: dict = {}  # this partition's leaf splits and compiled steps (see JaxTrainer)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return infer_batches(self._module, x, len(x))

    def _predict_batches(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        return infer_batches(self._module, x, batch_size)

    def _make_trainer(self, spec: TrainSpec) -> Trainer:
        return JaxTrainer(self, spec, self._partition, self._prepared)

    def _verify_native(self) -> None:
        self._variables()  # the module's structure still matches its layout

    def _stochastic_layers(self) -> list[str]:
        names = {p: n for n, p in self.layout.module_path.items()}
        return [names[p] for p, _ in stochastic_modules(self._module) if p in names]

    # ---------------------------------------------------------------- structure
    def _cut(self, last: str | None, layers: list[str]) -> JaxModel:
        module = nnx.clone(self._module)
        width = None
        if last is not None:
            dropped = [n for n in self.layers if n not in layers]
            dropped = [n for n in dropped if not any(in_layer(n, d) and n != d for d in dropped)]
            entries = {name: obj for name, _, obj in layer_entries(self._module)}
            width = static_width(entries[last], entries[dropped[0]]) if dropped else None
        module = cut_module(module, last, dropped if last is not None else [])
        return JaxModel(module, input_shape=self.input_shape, meta=self.meta, rng_prefix=self.rng_prefix,
                        layer_order=self.layers, canonical=self.canonical, static_width=width)

    def _feature_shape(self, x: np.ndarray | None) -> tuple | None:
        if x is None:
            if self.input_shape is None or None in self.input_shape:
                return None if self._static_width is None else (self._static_width,)
            x = np.zeros((1, *self.input_shape), np.float32)
        out = jax.eval_shape(_infer, self._module, jax.ShapeDtypeStruct((1, *x.shape[1:]), jnp.asarray(x[:1]).dtype))
        return tuple(out.shape[1:])

    def _attach_head(self, plan: HeadPlan, name: str, values: dict[str, np.ndarray]) -> None:
        self._module = append_head(self._module, name, build_head(plan, values))
        self._layer_order = self.layers
        self._layout = None

    def _output_shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple]:
        shapes: dict[str, tuple] = {}

        def run(module: nnx.Module, x: jax.Array) -> Any:
            set_modes(module, training=False)
            return trace_shapes(module, x, "", shapes)

        jax.eval_shape(run, self._module, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
        return shapes

    # ---------------------------------------------------------------- feature caching
    def _features(self, x: np.ndarray) -> np.ndarray:
        return infer_batches(self._module, x, len(x), stop=self._head)

    def _batched_features(self, x: np.ndarray, batch_size: int = FEATURE_BATCH) -> np.ndarray:
        return infer_batches(self._module, x, batch_size, stop=self._head)

    def _head_model(self) -> JaxModel:
        head = getattr(self._module, self._head)
        return JaxModel(head, input_shape=None, head_spec=self.head_spec, canonical=True,
                        rng_prefix=f"{self.rng_prefix}{self._head}.")
