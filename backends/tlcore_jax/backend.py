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
import jax.numpy as jnp
import optax
from flax import nnx

from tlcore.backend import Backend

from .layers import NamedSequential, Pool
from .model import JaxModel


class BatchNormAct(nnx.Module):
    """BatchNorm then ReLU in one custom module that reads its own ``use_running_average`` flag (the
    conformance suite's "custom" reference uses it); PyTorch's update rule, momentum 0.1; statistics
    in float32 and the output in the input's dtype (mixed precision)."""

    def __init__(self, features: int):
        self.scale, self.bias = nnx.Param(jnp.ones((features,))), nnx.Param(jnp.zeros((features,)))
        self.mean, self.var = nnx.BatchStat(jnp.zeros((features,))), nnx.BatchStat(jnp.ones((features,)))
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var = xs.mean(axis=(0, 1, 2)), xs.var(axis=(0, 1, 2))
            n = x.size // x.shape[-1]
            self.mean.set_value(0.9 * self.mean[...] + 0.1 * jax.lax.stop_gradient(mean))
            self.var.set_value(0.9 * self.var[...] + 0.1 * jax.lax.stop_gradient(var) * n / (n - 1))
        y = jax.nn.relu((xs - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...])
        return y.astype(x.dtype)


class CustomNet(nnx.Module):
    """A hand-written module (not a container): ``conv1, bnact1, conv2, bnact2, pool, fc``."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1, self.bnact1 = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs), BatchNormAct(8)
        self.conv2, self.bnact2 = nnx.Conv(8, 16, (3, 3), padding="SAME", rngs=rngs), BatchNormAct(16)
        self.pool, self.fc = Pool("avg"), nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bnact2(self.conv2(self.bnact1(self.conv1(x))))
        return self.fc(self.pool(x))


class TokenNet(nnx.Module):
    """Token features from token ids, taken as keyword inputs as a dict batch gives them:
    ``embed`` (20 ids -> 8 dims) then ``proj`` (8 -> 8), (N, T) ids -> (N, T, 8). It accepts an
    ``attention_mask`` (for a head's pooling) and does not use it itself."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.proj = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.proj(self.embed(input_ids))


#: what the "tokens" reference takes: one sample of 6 token ids and its attention mask
TOKENS_EXAMPLE = {"input_ids": jax.ShapeDtypeStruct((1, 6), jnp.int32),
                  "attention_mask": jax.ShapeDtypeStruct((1, 6), jnp.int32)}


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

    def reference_model(self, seed: int = 0, variant: str = "sequential") -> JaxModel:
        """The conformance suite's reference network on (8, 8, 3) NHWC images (``"sequential"``,
        ``"custom"``), or on token ids (``"tokens"``: a dict batch of ``input_ids`` and
        ``attention_mask`` (N, 6), see :class:`TokenNet`).

        BatchNorm uses ``momentum=0.9`` (Flax's convention: the weight of the old statistic), which is
        PyTorch's default ``momentum=0.1``.
        """
        rngs = nnx.Rngs(params=seed, dropout=seed)
        if variant == "custom":
            return JaxModel(CustomNet(rngs), input_shape=(8, 8, 3))
        if variant == "tokens":
            return JaxModel(TokenNet(rngs), example_input=TOKENS_EXAMPLE)
        if variant != "sequential":
            raise ValueError(f"unknown reference variant {variant!r}; valid: 'sequential', 'custom', 'tokens'")
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
