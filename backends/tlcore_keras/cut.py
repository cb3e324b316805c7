"""The structure of a ``keras.Model``: its cut points, copying, cutting and appending a head.

* Sequential and functional models (one input or several) are cut at any named layer, like
  ``keras.Model(model.inputs, layer.output)``: the cut model takes the same inputs. A functional or
  Sequential model used as a layer (a *container*) is listed as ``outer``, then ``outer.inner``...,
  and can be cut inside at those dotted names.
* A subclassed model has no graph. When its top-level layers run one after another (checked by
  recording a forward pass), it is rebuilt as a ``keras.Sequential`` of those layers and cut like one.
  Otherwise it is cut as the PyTorch backend cuts any module (:class:`CaptureCut`): the model's own
  ``call`` runs and stops when the layer to cut at returns, whose output is the cut model's; the
  layers after the cut are replaced by :class:`Dropped`. A head is appended to it by :class:`WithHead`.
* :class:`CaptureCut`, :class:`WithHead` and :class:`LayerModel` wrap a ``body`` that is left out
  of names (:func:`children` sees through them), so a cut or re-headed model keeps the original
  layer and tensor names.
* A cut model is always a copy (new layers, weights copied by name); the original is never touched.
  A model Keras cannot re-create from its config is copied from its attributes instead
  (``_keras.state_copy``).

Example:
    >>> inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a")], name="block")  # doctest: +SKIP
    >>> model = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2, name="out")])        # doctest: +SKIP
    >>> layer_paths(model)                                                                          # doctest: +SKIP
    ['block', 'block.a', 'out']
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tlcore.cut import in_layer
from tlcore.errors import CutError

from ._keras import (Functional, InputLayer, Sequential, call_takes_training, flatten_layers, graph_nodes, keras,
                     replace_tracked_layer, run_through_graph, state_copy, tf, tracked_layers)
from .head import is_tlcore_head
from .inputs import MASK_INPUT, ModelInputs, mask_of

Layer = keras.layers.Layer


# ---------------------------------------------------------------------------- wrappers
class _Captured(BaseException):
    """Ends a forward pass at the cut layer (a BaseException, so a model's own ``except Exception``
    and Keras' traceback filtering let it through)."""

    def __init__(self, value: Any):
        super().__init__()
        self.value = value


class Wrapper(keras.Model):
    """A model around ``body`` that tlcore names as ``body`` itself: its layers are ``body``'s, its
    own tensors ``body``'s own (see :func:`children` and :func:`roots`)."""

    def __init__(self, body: Layer, **kwargs):
        super().__init__(name=kwargs.pop("name", body.name), **kwargs)
        self.body = body
        self.built = True


class CaptureCut(Wrapper):
    """``body`` run by its own ``call`` until its top-level layer ``target`` returns; that output is
    this model's output.

    Example:
        >>> cut = CaptureCut(model, "bn")            # doctest: +SKIP
        >>> cut(x).shape                              # doctest: +SKIP
        TensorShape([2, 8, 8, 4])
    """

    def __init__(self, body: keras.Model, target: str, **kwargs):
        super().__init__(body, **kwargs)
        self.target = target

    def call(self, inputs, training=None):
        layer = get_path(self.body, self.target)
        with capturing(layer):
            try:
                self.body(inputs, training=training)
            except _Captured as captured:
                return captured.value
        raise CutError(f"the cut layer {self.target!r} did not run in {type(self.body).__name__}.call, so its "
                       "output could not be taken; cut at a layer that runs on every forward pass")


class WithHead(Wrapper):
    """``head(body(x))``: a head appended to a model that has no layer graph. A head built by tlcore
    also gets the ``attention_mask`` of a dict batch (the pool honours it)."""

    def __init__(self, body: keras.Model, head: Layer, **kwargs):
        super().__init__(body, **kwargs)
        self.head = head

    def call(self, inputs, training=None):
        features = self.body(inputs, training=training)
        kwargs = {"training": training} if call_takes_training(self.head) else {}
        if is_tlcore_head(self.head):
            kwargs["mask"] = mask_of(inputs, None)
        return self.head(features, **kwargs)


class LayerModel(Wrapper):
    """A ``keras.Model`` that is one layer (a user's head layer trained alone on cached features)."""

    def call(self, inputs, training=None):
        return self.body(inputs, **({"training": training} if call_takes_training(self.body) else {}))


class Dropped(Layer):
    """Stands for a layer a cut removed; a forward pass never reaches it (it stops at the cut)."""

    def __init__(self, dropped: str, cut: str, **kwargs):
        super().__init__(name=dropped, **kwargs)
        self.dropped, self.cut = dropped, cut
        self.built = True

    def call(self, *args, **kwargs):
        raise CutError(f"layer {self.dropped!r} was removed by the cut at {self.cut!r}, but the model's call runs "
                       f"it before {self.cut!r} returns: cut at a layer that runs after {self.dropped!r}")


@contextmanager
def capturing(layer: Layer):
    """While active, ``layer`` raises :class:`_Captured` with its output as soon as it returns."""
    own = vars(layer).get("call")  # an instance attribute of its own (e.g. while its calls are recorded)
    inner = layer.call

    def capture(*args, **kwargs):
        raise _Captured(inner(*args, **kwargs))

    object.__setattr__(layer, "call", capture)  # bypasses Keras' attribute tracking
    try:
        yield
    finally:
        if own is None:
            object.__delattr__(layer, "call")
        else:
            object.__setattr__(layer, "call", own)


# ---------------------------------------------------------------------------- structure
def is_graph(layer: Layer) -> bool:
    """True for models whose layers form a graph (Sequential or functional)."""
    return isinstance(layer, (Functional, Sequential))


def children(layer: Layer) -> list[Layer]:
    """Direct sub-layers: a graph model's layers in forward order (no ``InputLayer``), a wrapper's
    body's (and its head), otherwise the tracked sub-layers in creation order (no :class:`Dropped`)."""
    if isinstance(layer, Wrapper):
        own = children(layer.body)
        return own + [layer.head] if isinstance(layer, WithHead) else own
    if is_graph(layer):
        return [child for child in layer.layers if not isinstance(child, InputLayer)]
    return [child for child in tracked_layers(layer) if not isinstance(child, (InputLayer, Dropped))]


def roots(model: Layer) -> list[Layer]:
    """``model`` and the bodies it wraps: their own variables are the model's own (no layer name)."""
    out = [model]
    while isinstance(out[-1], Wrapper):
        out.append(out[-1].body)
    return out


def layer_paths(model: keras.Model, order: list[Layer] | None = None, prefix: str = "") -> list[str]:
    """Cut points in forward order; a container comes before its own (dotted) layers."""
    names = []
    for child in order if order is not None else children(model):
        path = prefix + child.name
        names.append(path)
        if is_graph(child):
            names += layer_paths(child, prefix=path + ".")
    return names


def get_path(model: Layer, path: str) -> Layer:
    """The layer at a dotted ``path`` (names of :func:`children`)."""
    layer = model
    for part in path.split("."):
        layer = next((c for c in children(layer) if c.name == part), None)
        if layer is None:
            raise CutError(f"no layer {path!r} in {model.name!r}")
    return layer


def input_shape_of(model: keras.Model) -> tuple | None:
    """Per-sample input shape of a graph model with one input (None where not known, and for a
    model with several inputs: the core checks the shapes of single arrays only)."""
    if not is_graph(model):
        return None
    spec = ModelInputs.of(model)
    if spec is None or len(spec.names) != 1:
        return None
    return spec.shapes[0]


def output_in(graph: Layer, layer: Layer):
    """The symbolic output of ``layer`` inside ``graph`` (one call, one output), else a CutError."""
    nodes = graph_nodes(graph, layer)
    if len(nodes) != 1:
        raise CutError(f"layer {layer.name!r} is called {len(nodes)} times in {graph.name!r}, so its output "
                       "is ambiguous; cut at a layer that is called once")
    outputs = nodes[0].outputs
    if len(outputs) != 1:
        raise CutError(f"layer {layer.name!r} has {len(outputs)} outputs; cut at a layer with one output")
    return outputs[0]


def input_struct(model: keras.Model):
    """The inputs to build a functional model on, as ``model`` takes them: one tensor, a list in
    input order, or a dict (a model built on a dict of inputs is called with one)."""
    struct = model.input if isinstance(model, Functional) else list(model.inputs)
    if isinstance(struct, (list, tuple)) and len(struct) == 1:
        return struct[0]
    return struct


# ---------------------------------------------------------------------------- subclassed models
@dataclass
class CallChain:
    """How a subclassed model's forward pass runs its top-level layers.

    ``layers`` is their call order; ``sequential`` is True when each layer, called once, consumes
    the previous one's output and the last one's output is the model's; ``reason`` says otherwise.
    """

    layers: list[Layer]
    sequential: bool
    reason: str = ""


def record_call_chain(model: keras.Model, input_shape: tuple | None) -> CallChain:
    """Run one inference forward pass of a subclassed ``model`` and record its top-level calls."""
    tops = children(model)
    if input_shape is None or any(d is None for d in input_shape):
        return CallChain(tops, False, f"its input shape is unknown ({input_shape})")
    calls = []
    for layer in tops:
        original = layer.call

        def recording(*args, _layer=layer, _call=original, **kwargs):
            out = _call(*args, **kwargs)
            given = args[0] if args else None
            if not isinstance(given, keras.KerasTensor):  # symbolic calls (building) are not the forward pass
                calls.append((_layer, given, out))
            return out

        object.__setattr__(layer, "call", recording)  # bypasses Keras' attribute tracking
    x = tf.zeros((1, *input_shape))
    try:
        out = model(x, training=False)
    finally:
        for layer in tops:
            object.__delattr__(layer, "call")
    order = [c[0] for c in calls]
    if not calls:
        return CallChain(tops, False, "its call() runs none of its top-level layers")
    counts = {id(layer): order.count(layer) for layer in tops}
    twice = [layer.name for layer in tops if counts[id(layer)] > 1]
    unused = [layer.name for layer in tops if counts[id(layer)] == 0]
    unique = list(dict.fromkeys(order))
    if twice:
        return CallChain(unique, False, f"layers {twice} are called more than once")
    if unused:
        return CallChain(unique + [t for t in tops if t not in unique], False,
                         f"layers {unused} are never called")
    prev = x
    for layer, given, produced in calls:
        if given is not prev:
            return CallChain(order, False, f"layer {layer.name!r} does not take the previous layer's output "
                                           "(call() computes something between or around its layers)")
        prev = produced
    if out is not prev:
        return CallChain(order, False, "call() changes the last layer's output before returning it")
    return CallChain(order, True)


def capture_cut(model: keras.Model, last: str, dropped: list[str]) -> keras.Model:
    """``model`` (a copy of a model without a layer graph; changed in place) computing the output of
    its layer ``last`` by running its own ``call`` (:class:`CaptureCut`); the top-level layers
    ``dropped`` (those after the cut) are replaced by :class:`Dropped`. A cut inside a functional or
    Sequential container cuts that container's graph."""
    body = model
    while isinstance(body, Wrapper):
        if isinstance(body, WithHead) and in_layer(last, body.head.name):
            if last != body.head.name:
                raise CutError(f"cannot cut inside the head {body.head.name!r} of {model.name!r}; cut before it, "
                               "or attach a new head")
            return model  # a cut at the head keeps everything
        body = body.body
    top, _, rest = last.partition(".")
    target = get_path(body, top)
    if rest:
        if not is_graph(target):
            raise CutError(f"cannot cut inside {target.name!r} ({type(target).__name__}): only Sequential and "
                           "functional models used as layers can be cut at their own layers")
        inner = cut_graph(target, rest)
        if isinstance(inner, Sequential) and not inner.built:
            inner.build(target.inputs[0].shape)
        _replace(body, target, inner)
    tops = {child.name: child for child in children(body)}
    for name in dropped:
        if "." not in name and name in tops and name != top:
            _replace(body, tops[name], Dropped(name, last))
    return CaptureCut(body, top)


def _replace(parent: Layer, old: Layer, new: Layer) -> None:
    if not replace_tracked_layer(parent, old, new):
        raise CutError(f"cannot cut {parent.name!r}: its layer {old.name!r} is not held in an attribute (or a list "
                       "or dict attribute) of the model, so it cannot be replaced")


def top_layers(model: Layer, names: list[str]) -> list[Layer]:
    """The top-level layers of ``model`` called ``names`` (in that order)."""
    by_name = {child.name: child for child in children(model)}
    return [by_name[n] for n in names if n in by_name]


# ---------------------------------------------------------------------------- copying and cutting
#: the graph classes :func:`clone_graph` clones layer by layer (a subclass, e.g. a tlcore head, is
#: re-created from its config, which keeps its class)
PLAIN_GRAPHS = (Functional, Sequential)


def clone_graph(model: keras.Model) -> keras.Model:
    """A functional or Sequential model with new layers (and new, not copied, weights): nested graph
    models cloned the same way, other layers re-created from their config or, when Keras cannot,
    copied from their attributes."""
    if type(model) not in PLAIN_GRAPHS:
        return model.__class__.from_config(model.get_config())

    def clone_layer(layer: Layer) -> Layer:
        try:
            if is_graph(layer):
                return clone_graph(layer)
            if not isinstance(layer, Wrapper):
                return layer.__class__.from_config(layer.get_config())
        except Exception:  # noqa: BLE001 - Keras raises several types for layers it cannot re-create
            pass
        return state_copy(layer, detach=True)

    return keras.models.clone_model(model, clone_function=clone_layer)


def copy_model(model: keras.Model, named_vars: Callable[[keras.Model], dict], input_shape: tuple | None = None
               ) -> keras.Model:
    """A new model with new layers and the same weights: re-created from its config where Keras can
    (weights copied by tensor name), else copied from its attributes (``_keras.state_copy``).

    ``named_vars(model)`` gives ``{tensor name: variable}``; ``input_shape`` builds a clone that
    Keras leaves unbuilt (subclassed models re-created from their config).
    """
    reason = "it is a tlcore wrapper"
    if not isinstance(model, Wrapper):
        clone, reason = _clone(model, named_vars, input_shape)
        if clone is not None:
            return clone
    try:
        return state_copy(model, copies=lambda layer: _graph_copies(layer, named_vars))
    except Exception as e:  # noqa: BLE001 - whatever an attribute's deepcopy raises (RecursionError too)
        raise CutError(f"cannot copy {type(model).__name__} {model.name!r}: Keras could not re-create it from its "
                       f"config ({reason}), and copying its attributes failed ({type(e).__name__}: {e}). Give "
                       "custom layers a get_config() (and register them with "
                       "@keras.saving.register_keras_serializable())") from e


def _clone(model: keras.Model, named_vars: Callable[[keras.Model], dict], input_shape: tuple | None
           ) -> tuple[keras.Model | None, str]:
    """``(clone, "")``: ``model`` re-created from its config with the same weights; ``(None, why not)``
    when Keras cannot, or the re-created model's tensors differ from the original's."""
    try:
        clone = clone_graph(model) if is_graph(model) else keras.models.clone_model(model)
    except Exception as e:  # noqa: BLE001 - Keras raises several types for models it cannot re-create
        return None, f"{type(e).__name__}: {str(e).strip()[:300]}"
    src, dst = named_vars(model), named_vars(clone)
    if len(dst) < len(src) and input_shape is not None:
        try:
            clone.build((None, *input_shape))
        except Exception as e:  # noqa: BLE001 - a subclassed clone may not build from a shape alone
            return None, f"its re-created copy could not be built ({type(e).__name__}: {e})"
        dst = named_vars(clone)
    if set(dst) != set(src):
        differ = sorted(set(dst) ^ set(src))[:6]
        return None, f"its re-created copy has tensors {differ} that differ from the original's"
    copy_weights(src, dst, clone.name)
    return clone, ""


def _graph_copies(layer: Layer, named_vars: Callable[[keras.Model], dict]) -> list[tuple] | None:
    """For a functional or Sequential model inside a model copied by its attributes: its clone
    (:func:`copy_model`, not attribute by attribute: a deep graph is too deep for that), and each of
    its layers and variables paired with the clone's; None when it is not a graph model or cannot
    be cloned (it is then copied by its attributes too)."""
    if not is_graph(layer) or isinstance(layer, Wrapper):
        return None
    try:
        clone = copy_model(layer, named_vars)
    except CutError:
        return None
    pairs = [(layer, clone)]
    originals, copies = flatten_layers(layer), flatten_layers(clone)
    names = lambda layers: [None if isinstance(x, InputLayer) else x.name for x in layers]  # noqa: E731
    if names(originals) == names(copies):  # (a clone's inputs may be renamed)
        pairs += list(zip(originals, copies))
    src, dst = named_vars(layer), named_vars(clone)
    return pairs + [(src[name], dst[name]) for name in src if name in dst]


def copy_weights(src: dict, dst: dict, what: str) -> None:
    """Assign every variable of ``dst`` from the one of the same name in ``src``."""
    missing = [n for n in dst if n not in src]
    if missing:
        raise CutError(f"cannot copy weights into {what!r}: tensors {missing[:5]} have no source "
                       "(a layer was renamed while copying)")
    for name, var in dst.items():
        if tuple(var.shape) != tuple(src[name].shape):
            raise CutError(f"cannot copy weights into {what!r}: {name} has shape {tuple(var.shape)} in the "
                           f"copy but {tuple(src[name].shape)} in the original")
        var.assign(src[name].value)


def as_sequential(model: keras.Model, chain: CallChain) -> keras.Model:
    """A subclassed model whose layers run in sequence, as an (unbuilt) Sequential sharing them."""
    return Sequential(list(chain.layers), name=model.name)


def cut_graph(model: keras.Model, last: str) -> keras.Model:
    """``model`` (a graph model, not copied) up to and including the layer at dotted path ``last``;
    it takes the same inputs.

    The result shares the layers of ``model``. A cut at a top-level layer leaves them untouched (a
    Sequential result is returned unbuilt: build it, or its copy, with the input shape); a cut inside
    a container calls layers on new symbolic inputs, so do that on a copy.
    """
    top, _, rest = last.partition(".")
    child = get_path(model, top)
    if rest and not is_graph(child):
        raise CutError(f"cannot cut inside {child.name!r} ({type(child).__name__}): only Sequential and "
                       "functional models used as layers can be cut at their own layers")
    if isinstance(model, Sequential):
        kept = []
        for layer in children(model):
            if layer is child:
                kept.append(cut_graph(child, rest) if rest else child)
                break
            kept.append(layer)
        return Sequential(kept, name=model.name)  # unbuilt: building would add nodes to shared layers
    out = output_in(model, child)
    if not rest:
        return keras.Model(input_struct(model), out, name=model.name)
    upto = keras.Model(model.inputs, out)
    inner = cut_graph(child, rest)
    inputs = [keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name) for x in model.inputs]
    outputs = run_through_graph(upto, inputs, lambda op: inner if op is child else op)
    struct = tf.nest.pack_sequence_as(model.input, inputs) if isinstance(model.input, dict) else single(inputs)
    return keras.Model(struct, outputs, name=model.name)


def single(tensors: list):
    """One tensor rather than a list of one, so the model is called with an array, not a list."""
    return tensors[0] if len(tensors) == 1 else tensors


def append_head(model: keras.Model, head: Layer) -> keras.Model:
    """``model`` (a graph model with one output, not copied) followed by the layer ``head``; a head
    built by tlcore also takes the model's ``attention_mask`` input, when it has one, as its mask."""
    if isinstance(model, Sequential):
        x = model.inputs[0]
        return Sequential([keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name), *children(model), head],
                          name=model.name)
    if len(model.outputs) != 1:
        raise CutError(f"{model.name!r} has {len(model.outputs)} outputs; cut it at a layer with one output "
                       "before attaching a head")
    features = model.outputs[0]
    spec = ModelInputs.of(model)
    if is_tlcore_head(head) and spec is not None and MASK_INPUT in spec.names:
        out = head(features, mask=dict(zip(spec.names, model.inputs))[MASK_INPUT])
    else:
        out = head(features)
    return keras.Model(input_struct(model), out, name=model.name)


def head_input(model: keras.Model, head: Layer):
    """The symbolic input of the head layer (the last layer) of a graph model."""
    return graph_nodes(model, head)[0].input_tensors[0]
