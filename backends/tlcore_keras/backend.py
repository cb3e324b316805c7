"""The Keras backend (imports Keras on TensorFlow, see ``_keras.py``)."""
from __future__ import annotations

from tlcore.backend import Backend
from tlcore.errors import unknown_name_message

from ._keras import keras, tf
from .model import KerasModel


@keras.saving.register_keras_serializable(package="tlcore")
class BatchNormAct(keras.layers.Layer):
    """BatchNormalization then ReLU in one custom layer that passes ``training`` on itself (the
    conformance suite's "custom" reference uses it)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn")

    def build(self, input_shape):
        self.bn.build(input_shape)

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(x, training=training))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)


class CustomNet(keras.Model):
    """A subclassed model: ``conv1, bnact1, conv2, bnact2, pool, fc``."""

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        init = keras.initializers
        self.conv1 = keras.layers.Conv2D(8, 3, padding="same", name="conv1",
                                         kernel_initializer=init.HeUniform(seed=seed))
        self.bnact1 = BatchNormAct(name="bnact1")
        self.conv2 = keras.layers.Conv2D(16, 3, padding="same", name="conv2",
                                         kernel_initializer=init.HeUniform(seed=seed + 1))
        self.bnact2 = BatchNormAct(name="bnact2")
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.fc = keras.layers.Dense(4, name="fc", kernel_initializer=init.GlorotUniform(seed=seed + 2))

    def call(self, x, training=None):
        x = self.bnact2(self.conv2(self.bnact1(self.conv1(x), training=training)), training=training)
        return self.fc(self.pool(x))


#: the reference networks (see ``Backend.reference_model``)
VARIANTS = ("sequential", "custom", "tokens")
#: the ``"tokens"`` reference: sequence length, vocabulary size and width
TOKENS, VOCABULARY, WIDTH = 6, 20, 8


def token_net(seed: int = 0) -> keras.Model:
    """The ``"tokens"`` reference: a functional model on ``{"input_ids": int (N, 6), "attention_mask":
    (N, 6)}`` with layers ``embed`` (``Embedding(20, 8)``) and ``proj`` (``Dense(8)``) giving (N, 6, 8)
    token features; ``attention_mask`` is an input the layers do not use (a head built by tlcore pools
    with it)."""
    init = keras.initializers
    ids = keras.Input((TOKENS,), dtype="int64", name="input_ids")
    mask = keras.Input((TOKENS,), dtype="int64", name="attention_mask")
    x = keras.layers.Embedding(VOCABULARY, WIDTH, name="embed",
                               embeddings_initializer=init.RandomNormal(seed=seed * 1000))(ids)
    x = keras.layers.Dense(WIDTH, name="proj", kernel_initializer=init.GlorotUniform(seed=seed * 1000 + 1),
                           bias_initializer=init.RandomUniform(-0.1, 0.1, seed=seed * 1000 + 2))(x)
    return keras.Model([ids, mask], x, name="tokens")


class KerasBackend(Backend):
    """Wraps any Keras 3 ``keras.Model``; inputs use Keras' layout (NHWC images).

    Example:
        >>> m = tl.wrap(keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3)))  # doctest: +SKIP
        >>> m.backend                                                                        # doctest: +SKIP
        'keras'
    """

    name = "keras"

    def owns(self, obj: object) -> bool:
        return isinstance(obj, keras.Model)

    def wrap(self, native: keras.Model, input_shape: tuple[int, ...] | None = None) -> KerasModel:
        return KerasModel(native, input_shape=None if input_shape is None else tuple(input_shape))

    def versions(self) -> dict[str, str]:
        return {"keras": keras.__version__, "tensorflow": tf.__version__}

    def reference_model(self, seed: int = 0, variant: str = "sequential") -> KerasModel:
        if variant not in VARIANTS:
            raise ValueError(unknown_name_message("reference model variant", variant, VARIANTS))
        if variant == "custom":
            return KerasModel(CustomNet(seed, name="custom"), input_shape=(8, 8, 3))
        if variant == "tokens":
            return KerasModel(token_net(seed))
        layers = keras.layers
        init = keras.initializers
        seeds = iter(range(seed * 1000, seed * 1000 + 100))

        def conv(filters: int, name: str):
            return layers.Conv2D(filters, 3, padding="same", name=name,
                                 kernel_initializer=init.HeUniform(seed=next(seeds)),
                                 bias_initializer=init.RandomUniform(-0.1, 0.1, seed=next(seeds)))

        # momentum/epsilon as PyTorch's BatchNorm2d defaults (Keras' are 0.99 and 1e-3)
        net = keras.Sequential([
            keras.Input((8, 8, 3)),
            conv(8, "conv1"), layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn1"),
            layers.ReLU(name="relu1"),
            conv(16, "conv2"), layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn2"),
            layers.ReLU(name="relu2"),
            layers.GlobalAveragePooling2D(name="pool"),
            layers.Dropout(0.25, seed=next(seeds), name="dropout"),
            layers.Dense(4, name="fc", kernel_initializer=init.GlorotUniform(seed=next(seeds)),
                         bias_initializer=init.RandomUniform(-0.1, 0.1, seed=next(seeds))),
        ], name="reference")
        return KerasModel(net)

    def zoo_model(self, name: str, config: dict) -> KerasModel:
        from .zoo import BUILDERS

        return KerasModel(BUILDERS[name](config), canonical=True)
