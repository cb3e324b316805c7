"""The structure of a ``keras.Model``: its cut points, copying, cutting and appending a head.

* Sequential and functional models are cut at any named layer, like ``keras.Model(inputs,
  layer.output)``; a functional or Sequential model used as a layer (a *container*) is listed as
  ``outer``, then ``outer.inner``..., and can be cut inside at those dotted names.
* A subclassed model has no graph. When its top-level layers run one after another (checked by
  recording a forward pass), it is rebuilt as a ``keras.Sequential`` of those layers and cut like one;
  otherwise it can be wrapped and trained whole, but not cut (a :class:`tl.CutError` says why).
* A cut model is always a copy (new layers, weights copied by name); the original is never touched.

Example:
    >>> inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a")], name="block")  # doctest: +SKIP
    >>> model = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2, name="out")])        # doctest: +SKIP
    >>> layer_paths(model)                                                                          # doctest: +SKIP
    ['block', 'block.a', 'out']
"""
from __future__ import annotations

from dataclasses import dataclass

from tlcore.errors import CutError, UnsupportedModelError

from ._keras import Functional, InputLayer, Sequential, graph_nodes, keras, run_through_graph, tf, tracked_layers

Layer = keras.layers.Layer


def is_graph(layer: Layer) -> bool:
    """True for models whose layers form a graph (Sequential or functional)."""
    return isinstance(layer, (Functional, Sequential))


def children(layer: Layer) -> list[Layer]:
    """Direct sub-layers: a graph model's layers in forward order (no ``InputLayer``), otherwise the
    tracked sub-layers in creation order."""
    if is_graph(layer):
        return [child for child in layer.layers if not isinstance(child, InputLayer)]
    return [child for child in tracked_layers(layer) if not isinstance(child, InputLayer)]


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
    """Per-sample input shape from a graph model's ``keras.Input`` (None where not known)."""
    if not is_graph(model):
        return None
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # an unbuilt Sequential has no inputs yet
        return None
    if not inputs:
        return None
    if len(inputs) != 1:
        raise UnsupportedModelError(
            f"{model.name!r} takes {len(inputs)} inputs; tlcore wraps models with one input tensor "
            "(build a single-input keras.Model around it, e.g. concatenating the inputs)")
    return tuple(inputs[0].shape[1:])


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
        return CallChain(tops, False, f"its input shape is unknown ({input_shape}); pass "
                                      "input_shape=(...) (per sample, no batch) to tl.wrap")
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


# ---------------------------------------------------------------------------- copying and cutting
def copy_model(model: keras.Model, named_vars, input_shape: tuple | None = None) -> keras.Model:
    """A new model with new layers and the same weights (copied by tensor name).

    ``named_vars(model)`` gives ``{tensor name: variable}``; ``input_shape`` builds a clone that
    Keras leaves unbuilt (subclassed models re-created from their config).
    """
    try:
        clone = keras.models.clone_model(model, recursive=True) if is_graph(model) else \
            keras.models.clone_model(model)
    except Exception as e:  # Keras raises several types for layers it cannot re-create from config
        raise CutError(f"cannot copy {type(model).__name__} {model.name!r}: Keras could not re-create it "
                       f"from its config ({type(e).__name__}: {e}). Give custom layers a get_config() "
                       "(and register them with @keras.saving.register_keras_serializable())") from e
    src, dst = named_vars(model), named_vars(clone)
    if len(dst) < len(src) and input_shape is not None:
        clone.build((None, *input_shape))
        dst = named_vars(clone)
    if set(dst) != set(src):
        raise CutError(f"cannot copy {model.name!r}: its copy has tensors {sorted(set(dst) ^ set(src))[:6]} "
                       "that differ from the original's (is the model built? pass input_shape to tl.wrap)")
    copy_weights(src, dst, clone.name)
    return clone


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
    """``model`` (a graph model, not copied) up to and including the layer at dotted path ``last``.

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
        return keras.Model(single(model.inputs), out, name=model.name)
    upto = keras.Model(model.inputs, out)
    inner = cut_graph(child, rest)
    inputs = [keras.Input(batch_shape=x.shape, dtype=x.dtype) for x in model.inputs]
    outputs = run_through_graph(upto, inputs, lambda op: inner if op is child else op)
    return keras.Model(single(inputs), outputs, name=model.name)


def single(tensors: list):
    """One tensor rather than a list of one, so the model is called with an array, not a list."""
    return tensors[0] if len(tensors) == 1 else tensors


def append_head(model: keras.Model, head: keras.Model) -> keras.Model:
    """``model`` (a graph model with one output, not copied) followed by the layer ``head``."""
    if isinstance(model, Sequential):
        x = model.inputs[0]
        return Sequential([keras.Input(batch_shape=x.shape, dtype=x.dtype), *children(model), head],
                          name=model.name)
    if len(model.outputs) != 1:
        raise CutError(f"{model.name!r} has {len(model.outputs)} outputs; cut it at a layer with one output "
                       "before attaching a head")
    return keras.Model(single(model.inputs), head(model.outputs[0]), name=model.name)


def head_input(model: keras.Model, head: Layer):
    """The symbolic input of the head layer (the last layer) of a graph model."""
    return graph_nodes(model, head)[0].input_tensors[0]
