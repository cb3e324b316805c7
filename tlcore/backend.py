"""What a backend implements: :class:`Backend` (one per framework) and, in ``model.py``, the
:class:`tlcore.model.Model` primitives.

Example:
    >>> import tlcore as tl
    >>> tl.get_backend("torch").name      # doctest: +SKIP
    'torch'
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .model import Model


class Backend(abc.ABC):
    """One framework's entry point; its module imports the framework at its top."""

    name: ClassVar[str]

    @abc.abstractmethod
    def owns(self, obj: object) -> bool:
        """True when ``obj`` is a model this backend can wrap."""

    @abc.abstractmethod
    def wrap(self, native: Any, input_shape: tuple[int, ...] | None = None) -> Model:
        """Wrap a native model as a :class:`Model`."""

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the framework packages, for checkpoints and benchmark reports."""

    @abc.abstractmethod
    def reference_model(self, seed: int = 0) -> Model:
        """The conformance suite's reference network, built natively and wrapped.

        Layers, in order: ``conv1`` (3->8, 3x3, same), ``bn1``, ``relu1``, ``conv2`` (8->16, 3x3,
        same), ``bn2``, ``relu2``, ``pool`` (global average), ``dropout`` (0.25), ``fc`` (16->4), on
        8x8 RGB images in the backend's own layout. Tensor names start with their layer's name.
        """

    def zoo_model(self, name: str, config: dict) -> Model:
        """Build zoo architecture ``name`` natively (see ``tlcore.zoo.archs``), with canonical state:
        PyTorch's tensor names and layouts, NHWC numpy input. Initial values do not matter: the zoo
        overwrites them."""
        from .errors import ZooError

        raise ZooError(f"backend {self.name!r} has no zoo")
