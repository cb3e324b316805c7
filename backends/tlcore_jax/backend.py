"""The JAX backend: Flax NNX modules, trained with Optax (imports jax and flax).

Example:
    >>> import tlcore as tl                            # doctest: +SKIP
    >>> m = tl.get_backend("jax").reference_model(0)   # doctest: +SKIP
    >>> m.input_shape                                  # doctest: +SKIP
    (8, 8, 3)
"""
from __future__ import annotations

import flax
import jax
import optax
from flax import nnx

from tlcore.backend import Backend

from .layers import NamedSequential, Pool
from .model import JaxModel


class JaxBackend(Backend):
    """Wraps any ``flax.nnx.Module``; inputs use the module's own layout (NHWC for convolutions)."""

    name = "jax"

    def owns(self, obj: object) -> bool:
        return isinstance(obj, nnx.Module)

    def wrap(self, native: nnx.Module, input_shape: tuple[int, ...] | None = None) -> JaxModel:
        kwargs = {} if input_shape is None else {"input_shape": tuple(input_shape)}
        return JaxModel(native, **kwargs)

    def versions(self) -> dict[str, str]:
        return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}

    def zoo_model(self, name: str, config: dict) -> JaxModel:
        """Zoo architecture ``name`` in NNX with PyTorch's names and layouts (see ``tlcore_jax.zoo``)."""
        from .zoo import BUILDERS

        return JaxModel(BUILDERS[name](config), canonical=True)

    def reference_model(self, seed: int = 0) -> JaxModel:
        """The conformance suite's reference network on (8, 8, 3) NHWC images.

        BatchNorm uses ``momentum=0.9`` (Flax's convention: the weight of the old statistic), which is
        PyTorch's default ``momentum=0.1``.
        """
        rngs = nnx.Rngs(params=seed, dropout=seed)
        net = NamedSequential(
            conv1=nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs),
            bn1=nnx.BatchNorm(8, momentum=0.9, rngs=rngs),
            relu1=nnx.relu,
            conv2=nnx.Conv(8, 16, (3, 3), padding="SAME", rngs=rngs),
            bn2=nnx.BatchNorm(16, momentum=0.9, rngs=rngs),
            relu2=nnx.relu,
            pool=Pool("avg"),
            dropout=nnx.Dropout(0.25, rngs=rngs),
            fc=nnx.Linear(16, 4, rngs=rngs),
        )
        return JaxModel(net, input_shape=(8, 8, 3))
