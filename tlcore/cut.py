"""Where to cut a network: :class:`LayerCut`.

A cut keeps the layers of ``Model.layers`` up to and including one of them and drops the rest.

Example:
    >>> from tlcore import LayerCut
    >>> layers = ["conv1", "bn1", "layer1", "layer1.0", "layer1.1", "fc"]
    >>> LayerCut(at="layer1").resolve(layers)
    'layer1'
    >>> LayerCut(drop_last=1).resolve(layers)
    'layer1'
    >>> LayerCut().resolve(layers) is None
    True
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import CutError, LayerNotFoundError, unknown_name_message


def top_level(layers: Sequence[str]) -> list[str]:
    """The layers that are not nested in another one (no dot in their name)."""
    return [name for name in layers if "." not in name]


@dataclass(frozen=True)
class LayerCut:
    """Keep layers up to and including ``at`` (a name or an index into ``Model.layers``),
    or drop the last ``drop_last`` top-level layers; with neither, keep everything.

    Dotted names (``"layer3.1"``) cut inside a sequential container: the container keeps its
    children up to that one.
    """

    at: str | int | None = None
    drop_last: int | None = None

    def __post_init__(self) -> None:
        if self.at is not None and self.drop_last is not None:
            raise CutError("LayerCut takes `at` or `drop_last`, not both")
        if self.at is not None and not isinstance(self.at, (str, int)):
            raise CutError(f"LayerCut(at=...) must be a layer name or an index, got {type(self.at).__name__}")
        if self.drop_last is not None and (not isinstance(self.drop_last, int) or self.drop_last < 0):
            raise CutError(f"LayerCut(drop_last=...) must be an int >= 0, got {self.drop_last!r}")

    def resolve(self, layers: Sequence[str]) -> str | None:
        """The name of the last layer kept, or ``None`` to keep the whole model.

        Raises:
            LayerNotFoundError: ``at`` is not a layer (the message lists the valid ones).
            CutError: the cut would keep no layer.
        """
        layers = list(layers)
        if isinstance(self.at, str):
            if self.at not in layers:
                raise LayerNotFoundError(unknown_name_message("layer", self.at, layers))
            return self.at
        if isinstance(self.at, int):
            if not -len(layers) <= self.at < len(layers):
                raise LayerNotFoundError(
                    f"layer index {self.at} is out of range for a model with {len(layers)} layers "
                    f"(valid: {-len(layers)} to {len(layers) - 1})")
            return layers[self.at]
        if self.drop_last:
            tops = top_level(layers)
            if self.drop_last >= len(tops):
                raise CutError(f"LayerCut(drop_last={self.drop_last}) would drop every layer; the model "
                               f"has {len(tops)} top-level layers: {tops}")
            return tops[-self.drop_last - 1]
        return None
