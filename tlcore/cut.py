"""Where to cut a network: :class:`LayerCut`, and which cut points a cut model keeps.

``Model.layers`` lists every cut point in forward order; a container (``layer1``) comes before its
children (``layer1.0``, ``layer1.1``), and a cut at a container keeps all of it. The rule for
numbers is the frameworks' own (``list(module.children())``, Keras' ``model.layers``): **an integer
counts top-level layers**, everywhere tlcore takes one (``LayerCut(at=i)``, ``FreezePolicy.up_to(i)``),
so ``LayerCut(at=-(n + 1))`` and ``LayerCut(drop_last=n)`` are the same cut. One exception makes
``drop_last=1`` drop a whole classifier: layers without weights after the last layer with weights
(a softmax, a flatten after Keras' 1x1-convolution "logits") count as one with it. To cut inside a
container, name the layer (``LayerCut(at="layer3.0")``).

Example:
    >>> from tlcore import LayerCut
    >>> layers = ["conv1", "bn1", "layer1", "layer1.0", "layer1.1", "fc"]
    >>> LayerCut(at="layer1").resolve(layers), LayerCut(drop_last=1).resolve(layers), LayerCut(at=-2).resolve(layers)
    ('layer1', 'layer1', 'layer1')
    >>> LayerCut().resolve(layers) is None
    True
    >>> kept_layers(layers, "layer1.0")
    ['conv1', 'bn1', 'layer1', 'layer1.0']
    >>> dropped_layers(layers, kept_layers(layers, "layer1.0"))
    ['layer1.1', 'fc']
"""
from __future__ import annotations

import numbers
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .errors import CutError, LayerNotFoundError, unknown_name_message


def top_level(layers: Sequence[str]) -> list[str]:
    """The layers that are not nested in another one (no dot in their name)."""
    return [name for name in layers if "." not in name]


def in_layer(name: str, layer: str) -> bool:
    """True when ``name`` is ``layer`` itself or nested in it (``layer3.1`` is in ``layer3``).

    Example:
        >>> in_layer("layer3.1", "layer3"), in_layer("layer30", "layer3")
        (True, False)
    """
    return name == layer or name.startswith(layer + ".")


def top_level_units(layers: Sequence[str], weighted: Collection[str] | None = None) -> list[list[str]]:
    """The top-level layers as the units integers count: one each, except that the layers without
    weights after the last one with weights (``weighted``: top-level layers that own a parameter)
    join it, so the classifier of ``[..., "logits", "flatten", "predictions"]`` is one unit.

    Example:
        >>> top_level_units(["conv", "pool", "logits", "flatten", "softmax"], weighted={"conv", "logits"})
        [['conv'], ['pool'], ['logits', 'flatten', 'softmax']]
    """
    tops = top_level(layers)
    units = [[name] for name in tops]
    if weighted:
        last = max((i for i, name in enumerate(tops) if name in weighted), default=len(tops) - 1)
        units = units[:last] + [tops[last:]]
    return units


def top_level_layer(layers: Sequence[str], index: int, what: str = "layer index",
                    weighted: Collection[str] | None = None) -> str:
    """The last layer of the top-level unit at ``index`` (negative counts from the end; see
    :func:`top_level_units`), or a LayerNotFoundError listing them."""
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        raise LayerNotFoundError(f"{what} must be a layer name or an int, got {index!r}")
    units = top_level_units(layers, weighted)
    if not -len(units) <= index < len(units):
        raise LayerNotFoundError(f"{what} {index} is out of range: integers count the {len(units)} top-level "
                                 f"layers ({-len(units)} to {len(units) - 1}): {['+'.join(u) for u in units]}. "
                                 "Name a layer to reach inside a container")
    return units[int(index)][-1]


def kept_layers(layers: Sequence[str], last: str | None) -> list[str]:
    """The cut points a cut after ``last`` keeps: every layer up to ``last`` and everything nested in
    it (a container keeps its children); None keeps all."""
    layers = list(layers)
    if last is None:
        return layers
    i = layers.index(last)
    return layers[: i + 1] + [name for name in layers[i + 1:] if in_layer(name, last)]


def dropped_layers(layers: Sequence[str], kept: Sequence[str]) -> list[str]:
    """The outermost layers a cut removes (those of ``layers`` not ``kept``, without their children),
    in forward order.

    Example:
        >>> dropped_layers(["a", "b", "b.0", "b.1", "c", "c.0"], ["a", "b", "b.0"])
        ['b.1', 'c']
    """
    gone = [name for name in layers if name not in set(kept)]
    return [name for name in gone if not any(in_layer(name, other) and name != other for other in gone)]


@dataclass(frozen=True)
class LayerCut:
    """Keep layers up to and including ``at`` (a name in ``Model.layers``, or an int counting
    top-level layers), or drop the last ``drop_last`` top-level layers; with neither, keep
    everything. Dotted names (``"layer3.1"``) cut inside a container.
    """

    at: str | int | None = None
    drop_last: int | None = None

    def __post_init__(self) -> None:
        if self.at is not None and self.drop_last is not None:
            raise CutError("LayerCut takes `at` or `drop_last`, not both")
        if self.at is not None and (isinstance(self.at, bool) or not isinstance(self.at, (str, numbers.Integral))):
            raise CutError(f"LayerCut(at=...) must be a layer name or an int, got {type(self.at).__name__}")
        if self.drop_last is not None and (isinstance(self.drop_last, bool)
                                           or not isinstance(self.drop_last, numbers.Integral) or self.drop_last < 0):
            raise CutError(f"LayerCut(drop_last=...) must be an int >= 0, got {self.drop_last!r}")

    def resolve(self, layers: Sequence[str], weighted: Collection[str] | None = None) -> str | None:
        """The name of the last layer kept, or ``None`` to keep the whole model; ``weighted`` names
        the top-level layers that own a parameter (see :func:`top_level_units`).

        Raises:
            LayerNotFoundError: ``at`` is not a layer (the message lists the valid ones).
            CutError: the cut would keep no layer.
        """
        layers = list(layers)
        if isinstance(self.at, str):
            if self.at not in layers:
                raise LayerNotFoundError(unknown_name_message("layer", self.at, layers))
            return self.at
        if self.at is not None:
            return top_level_layer(layers, self.at, "LayerCut(at=...)", weighted)
        if self.drop_last:
            units = top_level_units(layers, weighted)
            if self.drop_last >= len(units):
                raise CutError(f"LayerCut(drop_last={self.drop_last}) would drop every layer; the model "
                               f"has {len(units)} top-level layers: {['+'.join(u) for u in units]}")
            return units[-self.drop_last - 1][-1]
        return None
