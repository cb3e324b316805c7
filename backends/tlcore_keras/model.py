"""``KerasModel``: a ``keras.Model`` behind the :class:`tlcore.Model` API (NHWC inputs, as in Keras).

Example:
    >>> inputs = keras.Input((4,))                                                  # doctest: +SKIP
    >>> m = tl.wrap(keras.Model(inputs, keras.layers.Dense(2, name="fc")(inputs)))  # doctest: +SKIP
    >>> m.layers, list(m.state())                                                   # doctest: +SKIP
    (['fc'], ['fc.kernel', 'fc.bias'])
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from tlcore.backend import Trainer
from tlcore.cut import in_layer
from tlcore.errors import CutError, FreezePolicyError, UnsupportedModelError
from tlcore.freeze import Resolved, TensorInfo
from tlcore.head import HeadPlan
from tlcore.model import FEATURE_BATCH, Model
from tlcore.optim import TrainSpec

from . import cut, freeze, shared
from ._keras import Sequential, keras, tf
from .head import build_head
from .train import KerasTrainer, SharedStepTrainer


def _named(model: keras.Model) -> dict:
    """``{tensor name: variable}`` of a model (used to copy weights between a model and its clone)."""
    return {t.name: t.variable for t in freeze.tensors(model, cut.layer_paths(model))}


class KerasModel(Model):
    """A Keras 3 model (Sequential, functional or subclassed) wrapped as a :class:`tlcore.Model`.

    Args:
        native: the ``keras.Model``; it is shared, not copied (``tl.finetune`` copies).
        rng_prefix: prepended to tensor names when seeding random layers, so that a head trained
            alone (feature caching) draws the same dropout masks as inside the full model.
        canonical: report weights under PyTorch's names and layouts (zoo models, whose state is
            the same on every backend): ``conv1.weight`` ``(out, in, kh, kw)``, ``fc.weight``
            ``(out, in)``, ``bn1.running_mean``... An attached head is always reported so.

    Example:
        >>> m = tl.wrap(keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None))  # doctest: +SKIP
        >>> ft = tl.finetune(m, cut=tl.LayerCut(at="expanded_conv_2_add"), head=tl.Head.linear(5))   # doctest: +SKIP
    """

    backend = "keras"

    def __init__(self, native: keras.Model, *, rng_prefix: str = "", kinds: dict[str, str] | None = None,
                 canonical: bool = False, canonical_layers: tuple[str, ...] = (), **kwargs):
        if not isinstance(native, keras.Model):
            raise UnsupportedModelError(f"the keras backend wraps a keras.Model, got {type(native).__qualname__}")
        input_shape = kwargs.get("input_shape")
        if input_shape is None:
            input_shape = kwargs["input_shape"] = cut.input_shape_of(native)
        self._rng_prefix = rng_prefix
        self.canonical = canonical
        self._canonical_layers = tuple(canonical_layers)
        #: set on a head trained on cached features: its step is compiled once per process and structure
        self._shared_key: tuple | None = None
        self._set_model(native, input_shape, kinds)
        super().__init__(**kwargs)

    def _set_model(self, native: keras.Model, input_shape, kinds: dict[str, str] | None = None) -> None:
        self._model = native
        self._fns: dict[tuple, object] = {}
        self._chain: cut.CallChain | None = None
        self._ensure_built(input_shape)
        if not cut.is_graph(native):
            self._chain = cut.record_call_chain(native, input_shape)
        self._layers = cut.layer_paths(native, self._order)
        self._kinds = kinds or {p: type(layer).__name__ for p, layer in freeze.named_layers(native, self._order)}
        self._all: list[freeze.Tensor] | None = None
        self._infos = None

    @property
    def _order(self) -> list | None:
        return self._chain.layers if self._chain is not None and self._chain.sequential else None

    def _ensure_built(self, input_shape) -> None:
        """Create the weights of an unbuilt model from ``input_shape`` (Keras creates them lazily)."""
        model = self._model
        if model.built and all(layer.built for layer in cut.children(model)):
            return
        graph = cut.is_graph(model)
        if input_shape is None or (None in input_shape[-1:] if graph else None in input_shape):
            raise UnsupportedModelError(
                f"{model.name!r} is not built yet, so its weights do not exist; pass input_shape=(...) "
                "(per sample, no batch, e.g. (32, 32, 3)) to tl.wrap, or build it first (start it with a "
                "keras.Input, or call it once on a batch)")
        if graph:
            model.build((None, *input_shape))
        else:  # a subclassed model's build() does not build its layers; one call does
            model(tf.zeros((1, *input_shape)), training=False)

    @property
    def native(self) -> keras.Model:
        return self._model

    # ---------------------------------------------------------------- structure and state
    def _layer_names(self) -> list[str]:
        return list(self._layers)

    def _layer_kinds(self) -> dict[str, str]:
        return dict(self._kinds)

    def _canonical_at(self, path: str) -> bool:
        return self.canonical or any(in_layer(path, layer) for layer in self._canonical_layers)

    @property
    def _tensors(self) -> list[freeze.Tensor]:
        if self._all is None:
            self._all = freeze.tensors(self._model, self._layers, self._order, self._canonical_at)
        return self._all

    def _tensor_infos(self) -> list[TensorInfo]:
        return [t.info for t in self._tensors]

    def _read_state(self) -> dict[str, np.ndarray]:
        return {t.name: t.read() for t in self._tensors}

    def _write_state(self, arrays: dict[str, np.ndarray]) -> None:
        by_name = {t.name: t for t in self._tensors}
        for name, value in arrays.items():
            by_name[name].write(value)

    def _apply_freeze(self, resolved: Resolved) -> None:
        freeze.apply_mask(self._model, self._tensors, resolved, self._order)

    def trainable_variables(self) -> list:
        """The Keras variables training changes, in ``state()`` order (``trainable_mask()``'s True
        weights; BatchNorm statistics and seed states are updated by the forward pass instead)."""
        mask = self._resolved.mask
        return [t.variable for t in self._tensors if t.info.kind in freeze.TRAINABLE_KINDS and mask[t.name]]

    def _verify_native(self) -> None:
        """Keras' trainable flags must still be the mask's (a compiled step reads them, keras#6405)."""
        variables = self.trainable_variables()
        flagged = {id(v) for v in self._model.trainable_variables}
        if flagged != {id(v) for v in variables}:
            names = {id(t.variable): t.name for t in self._tensors}
            odd = sorted(names.get(i, "?") for i in flagged ^ {id(v) for v in variables})
            raise FreezePolicyError(
                f"Keras' trainable flags of {odd[:5]} were changed outside tlcore, so they no longer match "
                "trainable_mask(); change what trains with model.freeze(tl.FreezePolicy...) instead")

    # ---------------------------------------------------------------- running
    def _compiled(self, key: str, fn, x: np.ndarray):
        """``fn`` as a ``tf.function`` taking batches shaped like ``x`` (traced once per model and
        per-sample shape)."""
        key = (key, x.shape[1:])
        if key not in self._fns:
            spec = tf.TensorSpec((None, *x.shape[1:]), tf.float32)
            self._fns[key] = tf.function(fn, input_signature=[spec], autograph=False)
        return self._fns[key]

    def _forward(self, x: np.ndarray) -> np.ndarray:
        model = self._model
        return self._compiled("forward", lambda t: model(t, training=False), x)(x).numpy()

    def _make_trainer(self, spec: TrainSpec) -> Trainer:
        """A compiled step for ``spec`` and the current trainable set (the core drops it as soon as the
        policy changes what trains, so a stale step, keras#6405, is never run)."""
        variables = self.trainable_variables()
        rngs = [(self._rng_prefix + t.name, t.variable) for t in self._tensors if t.info.kind == "rng"]
        if self._shared_key is not None and variables:
            return SharedStepTrainer(self._model, rngs, spec, (*self._shared_key, replace(spec, seed=0)))
        return KerasTrainer(self._model, variables, rngs, spec)

    def _stochastic_layers(self) -> list[str]:
        return freeze.stochastic_layers(self._model, self._order)

    # ---------------------------------------------------------------- cutting and heads
    def _graph(self, what: str) -> keras.Model:
        """The native model as a graph model (a subclassed one whose layers run in sequence becomes a
        Sequential sharing its layers), or a CutError saying why it cannot be."""
        if self._chain is None:
            return self._model
        if self._chain.sequential:
            return cut.as_sequential(self._model, self._chain)
        raise CutError(
            f"cannot {what} {type(self._model).__name__} {self._model.name!r}: it is a subclassed keras.Model, "
            f"which has no layer graph, and tlcore cannot run its top-level layers in sequence because "
            f"{self._chain.reason}. Build it with the functional API (keras.Model(inputs, outputs)) or as a "
            "keras.Sequential, or put the part to keep in its own Sequential/functional model")

    def _cut(self, last: str | None, layers: list[str]) -> KerasModel:
        if last is None and self._chain is not None and not self._chain.sequential:
            copy = cut.copy_model(self._model, _named, self.input_shape)  # whole, from its config
        else:
            graph = self._graph("cut")
            top, _, inner = (last or "").partition(".")
            # cut at the top level first (no side effect on the original), copy, then cut inside the copy
            copy = cut.copy_model(cut.cut_graph(graph, top) if top else graph, _named, self.input_shape)
            if inner:
                copy = cut.cut_graph(copy, last)
            if isinstance(copy, Sequential) and not copy.built:
                copy.build((None, *self.input_shape))
        return KerasModel(copy, input_shape=self.input_shape, kinds=self._kinds, canonical=self.canonical,
                          canonical_layers=self._canonical_layers, meta=self.meta)

    def _feature_shape(self, x: np.ndarray | None) -> tuple | None:
        self._graph("attach a head to")  # a model that cannot take a head says so now
        if self._chain is None or self._chain.sequential:
            base = self._graph("attach a head to")
            if isinstance(base, Sequential) and not base.built:
                base.build((None, *self.input_shape))
            if len(base.outputs) != 1:
                raise CutError(f"{base.name!r} has {len(base.outputs)} outputs; cut it at a layer with one output "
                               "before attaching a head")
            shape = tuple(base.outputs[0].shape[1:])
            if x is None or all(d is not None for d in shape):
                return shape
        elif x is None:
            return None
        return tuple(self._forward(x[:1]).shape[1:])

    def _attach_head(self, plan: HeadPlan, name: str, values: dict[str, np.ndarray]) -> None:
        base = self._graph("attach a head to")
        symbolic = tuple(base.outputs[0].shape[1:])
        feature_shape = plan.feature_shape if plan.spec.pool == "flatten" and None in symbolic else symbolic
        head = build_head(plan, values, feature_shape, name)
        kinds = {**self._kinds, name: "Head", **{f"{name}.{layer.name}": type(layer).__name__
                                                 for layer in cut.children(head)}}
        self._canonical_layers += (name,)
        self._set_model(cut.append_head(base, head), self.input_shape, kinds)

    def _output_shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple]:
        shapes: dict[str, tuple] = {}
        if self._chain is not None:
            return shapes
        for path, layer in freeze.named_layers(self._model):
            if path not in self._layers:
                continue
            parent = self._model if "." not in path else cut.get_path(self._model, path.rpartition(".")[0])
            try:
                shapes[path] = tuple(cut.output_in(parent, layer).shape[1:])
            except (CutError, AttributeError, ValueError, StopIteration):
                continue
        return shapes

    # ---------------------------------------------------------------- feature caching
    def _head_layer(self) -> keras.Model:
        return cut.get_path(self._model, self._head)

    def _features(self, x: np.ndarray) -> np.ndarray:
        """The frozen part's output, already pooled by the head's (weightless) ``pool`` layer: the
        cached features are then small, and :meth:`_head_model` starts after the pool."""
        return self._batched_features(x)

    def _batched_features(self, x: np.ndarray, batch_size: int = FEATURE_BATCH) -> np.ndarray:
        fn, variables = self._feature_function(x)
        values = [tf.convert_to_tensor(v) for v in variables]  # read once for all chunks
        return np.concatenate([fn(x[i:i + batch_size], values).numpy() for i in range(0, len(x), batch_size)])

    def _feature_function(self, x: np.ndarray) -> tuple:
        """``(fn, variables)``: ``fn(batch, values of variables)`` computes the pooled features. It is
        traced once per process for all models of the same structure (:mod:`.shared`)."""
        key = ("features", x.shape[1:])
        if key not in self._fns:
            pool = cut.children(self._head_layer())[0]
            features = keras.Model(cut.single(self._model.inputs), cut.head_input(self._model, self._head_layer()))
            variables = [*features.variables, *pool.variables]

            def make():
                def run(batch, values):
                    with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                        return pool(features(batch, training=False))
                signature = [tf.TensorSpec((None, *x.shape[1:]), tf.float32),
                             [tf.TensorSpec(v.shape, v.dtype) for v in variables]]
                return tf.function(run, input_signature=signature, autograph=False).get_concrete_function()

            structure = shared.structure_key(features)
            pool_key = shared.structure_key(pool)
            fn = make() if structure is None or pool_key is None else \
                shared.shared(("features", structure, pool_key, x.shape[1:]), make)
            self._fns[key] = (fn, variables)
        return self._fns[key]

    def _head_model(self) -> KerasModel:
        """The head after its ``pool`` layer (see :meth:`_features`), sharing its weights."""
        head = self._head_layer()
        pool, *rest = cut.children(head)
        pooled = tuple(pool.compute_output_shape((None, *head.inputs[0].shape[1:]))[1:])
        model = Sequential([keras.Input(pooled), *rest], name=head.name)
        prefix = f"{self._head}."
        kinds = {p[len(prefix):]: k for p, k in self._kinds.items() if p.startswith(prefix)}
        head_model = KerasModel(model, input_shape=pooled, kinds=kinds, head_spec=self.head_spec,
                                rng_prefix=f"{self._rng_prefix}{prefix}", canonical=True)
        head_model._shared_key = ("head", self.head_spec, pooled)
        return head_model
