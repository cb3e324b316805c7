"""``KerasModel``: a ``keras.Model`` behind the :class:`tlcore.Model` API (NHWC inputs, as in Keras).

Inputs are one array, a dict of arrays by input name or a tuple in the model's input order (see
``inputs.py``); every compiled function takes that structure.

Example:
    >>> inputs = keras.Input((4,))                                                  # doctest: +SKIP
    >>> m = tl.wrap(keras.Model(inputs, keras.layers.Dense(2, name="fc")(inputs)))  # doctest: +SKIP
    >>> m.layers, list(m.state())                                                   # doctest: +SKIP
    (['fc'], ['fc.kernel', 'fc.bias'])
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tlcore import data
from tlcore.adapters import LoraTarget
from tlcore.backend import Trainer
from tlcore.cut import dropped_layers, in_layer, top_level
from tlcore.errors import CutError, FreezePolicyError, UnsupportedModelError
from tlcore.freeze import Resolved, TensorInfo
from tlcore.head import HeadPlan
from tlcore.model import FEATURE_BATCH, Model
from tlcore.optim import TrainSpec

from . import cut, distributed, freeze, lora, shared
from ._keras import Sequential, keras, tf
from .head import build_head, is_tlcore_head
from .inputs import MASK_INPUT, ModelInputs, mask_of, signature, structure_key
from .train import KerasTrainer, SharedStepTrainer


def _named(model: keras.Model) -> dict:
    """``{tensor name: variable}`` of a model (used to copy weights between a model and its clone)."""
    return {t.name: t.variable for t in freeze.tensors(model, cut.layer_paths(model))}


class KerasModel(Model):
    """A Keras 3 model (Sequential, functional with one input or several, or subclassed) wrapped as
    a :class:`tlcore.Model`.

    Args:
        native: the ``keras.Model``; it is shared, not copied (``tl.finetune`` copies).
        rng_prefix: prepended to tensor names when seeding random layers and when looking up their
            rates in the optimizer's plan (``TrainSpec.rates()``, named in the whole model), so that a
            head trained alone (feature caching) draws the same dropout masks and trains at the same
            rates as inside the full model.
        canonical: report weights under PyTorch's names and layouts (zoo models, whose state is
            the same on every backend): ``conv1.weight`` ``(out, in, kh, kw)``, ``fc.weight``
            ``(out, in)``, ``bn1.running_mean``... An attached head is always reported so.
        order: the names of the top-level layers in forward order, for a model without a layer
            graph whose order is known (a cut or re-headed copy); default: recorded from one
            forward pass when the input shape is known, else creation order.

    Example:
        >>> m = tl.wrap(keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None))  # doctest: +SKIP
        >>> ft = tl.finetune(m, cut=tl.LayerCut(at="expanded_conv_2_add"), head=tl.Head.linear(5))   # doctest: +SKIP
    """

    backend = "keras"

    def __init__(self, native: keras.Model, *, rng_prefix: str = "", kinds: dict[str, str] | None = None,
                 canonical: bool = False, canonical_layers: tuple[str, ...] = (), order: list[str] | None = None,
                 **kwargs):
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
        #: per-sample shape of the attached head's input, where known
        self._head_shape: tuple | None = None
        self._set_model(native, input_shape, kinds, order)
        super().__init__(**kwargs)

    def _set_model(self, native: keras.Model, input_shape, kinds: dict[str, str] | None = None,
                   order: list[str] | None = None) -> None:
        self._model = native
        self._fns: dict[tuple, object] = {}
        self._chain: cut.CallChain | None = None
        self._sequential: keras.Model | None = None
        self._ensure_built(input_shape)
        if not cut.is_graph(native):
            self._chain = cut.CallChain(cut.top_layers(native, order), False) if order is not None else \
                cut.record_call_chain(native, input_shape)
        self._input_spec = ModelInputs.of(native) if cut.is_graph(native) else None
        self._layers = cut.layer_paths(native, self._order)
        self._kinds = kinds or {p: type(layer).__name__ for p, layer in freeze.named_layers(native, self._order)}
        self._all: list[freeze.Tensor] | None = None
        self._infos = None

    @property
    def _order(self) -> list | None:
        """The top-level layers in forward order (None: a graph model's own order)."""
        return self._chain.layers if self._chain is not None else None

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

    # ---------------------------------------------------------------- LoRA adapters (lora.py)
    def _lora_targets(self) -> list[LoraTarget]:
        """Every Dense layer outside the head, in forward order (not EinsumDense, quantized Dense
        or Dense with a kernel constraint); ``transposed`` where ``state()`` shows Keras' (in, out)."""
        return lora.targets(self._tensors, freeze.named_layers(self._model, self._order), self._head)

    def _add_lora(self, target: LoraTarget, scale: float, dropout: float, a: np.ndarray, b: np.ndarray) -> None:
        lora.add_lora(cut.get_path(self._model, target.module), scale, dropout, a, b)
        self._restructured()

    def _remove_lora(self, module: str) -> None:
        lora.remove_lora(cut.get_path(self._model, module))
        self._restructured()

    def _restructured(self) -> None:
        """Variables were added or removed in place: list the tensors again and retrace every
        compiled function (a traced one would still compute without them)."""
        self._all = None
        self._infos = None
        self._fns.clear()

    # ---------------------------------------------------------------- running
    def _check_inputs(self, x: Any) -> None:
        """A graph model's named inputs must all be in a dict batch (and no other key), a tuple must
        have one array per input, and each array the shape its input takes (see :class:`ModelInputs`);
        an integer input (token ids) takes whole numbers within its dtype's range: the cast to it would
        truncate or wrap others silently (uint8 pixels, which tlcore gives as float32, stay whole)."""
        spec = self._input_spec
        if spec is None:
            return
        for key, dtype, a in zip(spec.names, spec.dtypes, spec.check(x)):
            if dtype.kind not in "iu" or a.dtype.kind not in "iuf" or a.size == 0:
                continue
            info = np.iinfo(dtype)
            low, high = a.min(), a.max()
            fraction = a.dtype.kind == "f" and not np.array_equal(a, np.trunc(a))
            if fraction or low < info.min or high > info.max:
                where = f"x[{key!r}]" if isinstance(x, (dict, tuple)) else "x"
                what = "values that are not whole numbers" if fraction else f"values from {low} to {high}"
                raise data.DataError(f"{where} holds {what}, but the input {key!r} takes {dtype} (e.g. token ids); "
                                     "give integers in its range")

    def _to_inputs(self, x: Any) -> Any:
        """A numpy batch as the model is called: a graph model's inputs put in its order and cast to
        its dtypes (see :class:`ModelInputs`); anything else as it is."""
        return x if self._input_spec is None else self._input_spec.convert(x)

    def _compiled(self, key: str, fn, inputs: Any):
        """``fn`` as a ``tf.function`` taking batches structured like ``inputs`` (traced once per model
        and per-sample shapes)."""
        key = (key, structure_key(inputs))
        if key not in self._fns:
            self._fns[key] = tf.function(fn, input_signature=[signature(inputs)], autograph=False)
        return self._fns[key]

    def _forward(self, x: Any) -> np.ndarray:
        model, inputs = self._model, self._to_inputs(x)
        return self._compiled("forward", lambda t: model(t, training=False), inputs)(inputs).numpy()

    def _replicas(self, strategy: Any):
        """``tl.distribute.DataParallel(devices=k)``: ``k`` (default: all) of the visible logical
        devices, the GPUs or else the CPUs, under a ``tf.distribute.MirroredStrategy``, or every
        replica of ``engine`` (see :mod:`.distributed`); more than TensorFlow sees raises
        :class:`tlcore.DistributedError`."""
        return distributed.replicas(strategy)

    def _make_trainer(self, spec: TrainSpec) -> Trainer:
        """A compiled step for ``spec`` and the current trainable set (the core drops it as soon as the
        policy changes what trains, so a stale step, keras#6405, is never run); not started (the core
        calls ``reset`` or ``resume``). A head view looks its tensors' rates up under their names in the
        whole model (``rng_prefix``: the head's name and a dot)."""
        mask = self._resolved.mask
        tensors = [t for t in self._tensors if t.info.kind in freeze.TRAINABLE_KINDS and mask[t.name]]
        rngs = [(self._rng_prefix + t.name, t.variable) for t in self._tensors if t.info.kind == "rng"]
        if spec.strategy is not None:  # data parallel (the core passes it with several replicas only)
            frozen = {id(t.variable) for t in self._tensors
                      if not mask[t.name] and t.info.kind in freeze.TRAINABLE_KINDS}
            return distributed.MirroredTrainer(self._model, tensors, frozen, rngs, spec, self._to_inputs,
                                               prefix=self._rng_prefix)
        if self._shared_key is not None and tensors and spec.precision != "float16":  # float16 scales its loss
            return SharedStepTrainer(self._model, tensors, rngs, spec, self._shared_key, self._rng_prefix)
        return KerasTrainer(self._model, tensors, rngs, spec, self._to_inputs, prefix=self._rng_prefix)

    def _stochastic_layers(self) -> list[str]:
        return freeze.stochastic_layers(self._model, self._order)

    # ---------------------------------------------------------------- cutting and heads
    def _graph(self) -> keras.Model | None:
        """The native model as a graph model (a subclassed one whose layers run in sequence becomes a
        built Sequential sharing its layers); None for a model without a layer graph."""
        if self._chain is None:
            if isinstance(self._model, Sequential) and not self._model.built:  # e.g. a zoo model's cut copy
                self._model.build((None, *self.input_shape))
            return self._model
        if not self._chain.sequential:
            return None
        if self._sequential is None:
            self._sequential = cut.as_sequential(self._model, self._chain)
            self._sequential.build((None, *self.input_shape))
        return self._sequential

    def _top_names(self) -> list[str]:
        return top_level(self._layers)

    def _cut(self, last: str | None, layers: list[str]) -> KerasModel:
        order = None
        if self._chain is not None and not self._chain.sequential:
            # no layer graph: copy, then cut by running the model's own call (CaptureCut)
            copy = cut.copy_model(self._model, _named, self.input_shape)
            if last is not None:
                copy = cut.capture_cut(copy, last, dropped_layers(self._layers, layers))
            if isinstance(copy, cut.Wrapper):
                order = top_level(layers)
        else:  # a graph model, or a subclassed one run in sequence as an (unbuilt) Sequential of its layers
            graph = self._model if self._chain is None else cut.as_sequential(self._model, self._chain)
            top, _, inner = (last or "").partition(".")
            # cut at the top level first (no side effect on the original), copy, then cut inside the copy
            copy = cut.copy_model(cut.cut_graph(graph, top) if top else graph, _named, self.input_shape)
            if inner:
                copy = cut.cut_graph(copy, last)
            if isinstance(copy, Sequential) and not copy.built:
                copy.build((None, *self.input_shape))
        return KerasModel(copy, input_shape=self.input_shape, kinds=self._kinds, canonical=self.canonical,
                          canonical_layers=self._canonical_layers, meta=self.meta, order=order)

    def _feature_shape(self, x: Any) -> tuple | None:
        graph = self._graph()
        if graph is not None:
            if len(graph.outputs) != 1:
                raise CutError(f"{graph.name!r} has {len(graph.outputs)} outputs; cut it at a layer with one "
                               "output before attaching a head")
            shape = tuple(graph.outputs[0].shape[1:])
            if x is None or all(d is not None for d in shape):
                return shape
        elif x is None:  # no graph: one forward pass on zeros, where the input shape is known
            if not data.fully_known(self.input_shape):
                return None
            x = np.zeros((1, *self.input_shape), np.float32)
        return tuple(self._forward(data.take(x, slice(0, 1))).shape[1:])

    def _attach_head(self, plan: HeadPlan, name: str, values: dict[str, np.ndarray]) -> None:
        graph = self._graph()
        if graph is not None:
            symbolic = tuple(graph.outputs[0].shape[1:])
            feature_shape = plan.feature_shape if plan.spec.pool == "flatten" and None in symbolic else symbolic
            head = build_head(plan, values, feature_shape, name)
            native, order = cut.append_head(graph, head), None
        else:
            feature_shape = plan.feature_shape
            head = build_head(plan, values, feature_shape, name)
            native, order = cut.WithHead(self._model, head), [*self._top_names(), name]
        kinds = {**self._kinds, name: "Head", **{f"{name}.{layer.name}": type(layer).__name__
                                                 for layer in cut.children(head)}}
        self._canonical_layers += (name,)
        self._head_shape = tuple(feature_shape)
        self._set_model(native, self.input_shape, kinds, order)

    def _attach_native_head(self, name: str, head: Any) -> None:
        """Append the user's own Keras layer or model ``head`` (renamed ``name``) after this model's
        output as it is; it trains, and its tensors are named ``name.``... An unbuilt head is built on
        the features' shape (a model without a layer graph needs its input shape for that)."""
        if not isinstance(head, keras.layers.Layer):
            raise UnsupportedModelError(f"a head for a keras model must be a keras.layers.Layer or a keras.Model "
                                        f"(or a tl.Head), got {type(head).__qualname__}")
        graph = self._graph()
        shape = self._feature_shape(None)
        if graph is None and not head.built and (shape is None or None in shape):
            raise UnsupportedModelError(
                f"the head {type(head).__name__} is not built and the shape of the features it takes is unknown "
                f"({shape}); build it first (e.g. head.build((None, *feature_shape))), or pass input_shape=(...) "
                "to tl.finetune")
        head.name = name  # its name in the model; the core picked one no other layer has
        if graph is not None:
            native, order = cut.append_head(graph, head), None  # calling it on the features builds it
        else:
            if not head.built:
                head(np.zeros((1, *shape), np.float32))
            native, order = cut.WithHead(self._model, head), [*self._top_names(), name]
        kinds = {**self._kinds, name: type(head).__name__,
                 **{f"{name}.{p}": type(layer).__name__ for p, layer in freeze.named_layers(head)}}
        self._head_shape = shape
        self._set_model(native, self.input_shape, kinds, order)

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
    def _head_layer(self) -> keras.layers.Layer:
        return cut.get_path(self._model, self._head)

    def _features(self, x: Any) -> np.ndarray:
        """The head's input; for a head built by tlcore already pooled by its (weightless) ``pool``
        layer with the batch's attention mask: the cached features are then small, and
        :meth:`_head_model` starts after the pool."""
        return self._batched_features(x)

    def _batched_features(self, x: Any, batch_size: int = FEATURE_BATCH) -> np.ndarray:
        fn, variables = self._feature_function(self._to_inputs(data.take(x, slice(0, 1))))
        if self._strategy is not None:  # in a data-parallel fit: each replica computes its shard
            chunks = [self._to_inputs(data.take(x, slice(i, i + batch_size)))
                      for i in range(0, data.num_samples(x), batch_size)]
            return distributed.features(distributed.strategy_for(self._strategy), fn, variables, chunks)
        values = [tf.convert_to_tensor(v) for v in variables]  # read once for all chunks
        return np.concatenate([fn(self._to_inputs(data.take(x, slice(i, i + batch_size))), values).numpy()
                               for i in range(0, data.num_samples(x), batch_size)])

    def _feature_function(self, inputs: Any) -> tuple:
        """``(fn, variables)``: ``fn(batch, values of variables)`` computes the (pooled) features of a
        batch structured like ``inputs``. It is traced once per process for all graph models of the
        same structure (:mod:`.shared`)."""
        key = ("features", structure_key(inputs))
        if key in self._fns:
            return self._fns[key]
        head = self._head_layer()
        pool = cut.children(head)[0] if is_tlcore_head(head) else None
        graph = cut.is_graph(self._model)
        features = keras.Model(cut.input_struct(self._model), cut.head_input(self._model, head)) if graph \
            else self._model.body  # a WithHead: the head's input is its body's output
        variables = [*features.variables, *(pool.variables if pool is not None else [])]
        spec = self._input_spec

        def make():
            def run(batch, values):
                with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                    out = features(batch, training=False)
                    return out if pool is None else pool(out, mask=mask_of(batch, spec))
            sig = [signature(inputs), [tf.TensorSpec(v.shape, v.dtype) for v in variables]]
            return tf.function(run, input_signature=sig, autograph=False).get_concrete_function()

        structure = shared.structure_key(features) if graph else None
        pool_key = "none" if pool is None else shared.structure_key(pool)
        masked = spec.names.index(MASK_INPUT) if spec is not None and MASK_INPUT in spec.names else None
        fn = make() if structure is None or pool_key is None else \
            shared.shared(("features", structure, pool_key, masked, structure_key(inputs)), make)
        self._fns[key] = (fn, variables)
        return self._fns[key]

    def _head_model(self) -> KerasModel:
        """The head alone, sharing its weights: for a head built by tlcore, the layers after its
        ``pool`` (see :meth:`_features`); a user's own head as it is."""
        head = self._head_layer()
        prefix = f"{self._head}."
        kinds = {p[len(prefix):]: k for p, k in self._kinds.items() if p.startswith(prefix)}
        if not is_tlcore_head(head):
            native = head if isinstance(head, keras.Model) else cut.LayerModel(head)
            return KerasModel(native, input_shape=self._head_shape, kinds=kinds,
                              rng_prefix=f"{self._rng_prefix}{prefix}")
        pool, *rest = cut.children(head)
        pooled = tuple(pool.compute_output_shape((None, *head.inputs[0].shape[1:]))[1:])
        model = Sequential([keras.Input(pooled), *rest], name=head.name)
        head_model = KerasModel(model, input_shape=pooled, kinds=kinds, head_spec=self.head_spec,
                                rng_prefix=f"{self._rng_prefix}{prefix}", canonical=True)
        head_model._shared_key = ("head", self.head_spec, pooled)
        return head_model
