"""Keras models beyond one input and one sequence of layers: functional models with several inputs
(a dict by input name or a tuple in input order), subclassed models whose layers do not run in
sequence (cut by capturing a layer's output), the user's own Keras head, the heads' pools on token
features (with and without an attention mask), mixed precision and the classifier ``drop_last``
removes."""
import os

import numpy as np
import pytest

import tlcore as tl
from tlcore.head import POOLS, pool_reference
from tlcore.testing import reference_finetune, sample_data, selected_backends

if "keras" not in selected_backends():
    pytest.skip("keras is not in TLCORE_TEST_BACKENDS", allow_module_level=True)

BACKEND = tl.get_backend("keras")  # before `import keras`: makes Keras run on TensorFlow

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tlcore_keras import PrecisionNotSupportedError  # noqa: E402
from tlcore_keras._keras import flatten_layers  # noqa: E402
from tlcore_keras.cut import CaptureCut, Dropped  # noqa: E402

L = keras.layers
init = keras.initializers


# ------------------------------------------------------------------------------------ several inputs
def two_inputs(seed: int = 0) -> keras.Model:
    """``image`` (8, 8, 3) -> conv, bn, gap; ``meta`` (4,) -> meta_fc; concat -> mix -> fc (3)."""
    image, meta = keras.Input((8, 8, 3), name="image"), keras.Input((4,), name="meta")
    a = L.Conv2D(4, 3, padding="same", name="conv", kernel_initializer=init.HeUniform(seed))(image)
    a = L.GlobalAveragePooling2D(name="gap")(L.BatchNormalization(name="bn")(a))
    b = L.Dense(4, name="meta_fc", kernel_initializer=init.GlorotUniform(seed + 1))(meta)
    h = L.Dense(6, activation="relu", name="mix", kernel_initializer=init.GlorotUniform(seed + 2))(
        L.Concatenate(name="concat")([a, b]))
    return keras.Model([image, meta], L.Dense(3, name="fc")(h), name="two")


def two_input_batch(n: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
            "meta": rng.normal(size=(n, 4)).astype(np.float32)}


def test_several_inputs_take_a_dict_or_a_tuple_and_cut_at_any_layer():
    native = two_inputs()
    m = tl.wrap(native)
    assert m.layers == ["conv", "bn", "gap", "meta_fc", "concat", "mix", "fc"] and m.input_shape is None
    x = two_input_batch()
    expected = native([x["image"], x["meta"]], training=False).numpy()
    np.testing.assert_allclose(m.predict(x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.predict((x["image"], x["meta"]), batch_size=5), expected, rtol=1e-5, atol=1e-6)
    gap = tl.finetune(m, cut=tl.LayerCut(at="gap"))  # uses the image only, still takes both inputs
    manual = native.get_layer("gap")(native.get_layer("bn")(native.get_layer("conv")(x["image"]), training=False))
    np.testing.assert_allclose(gap.predict(x), manual.numpy(), rtol=1e-5, atol=1e-6)
    assert gap.layers == ["conv", "bn", "gap"] and list(gap.state())[-1] == "bn.moving_variance"


def test_several_inputs_freeze_fit_and_round_trip(tmp_path):
    m = tl.wrap(two_inputs())
    ft = tl.finetune(m, cut=tl.LayerCut(at="mix"), head=tl.Head.linear(2), freeze=tl.FreezePolicy.up_to("meta_fc"))
    assert ft.layers[-3:] == ["head", "head.pool", "head.out"]
    x, y = two_input_batch(), np.arange(12) % 2
    original, snap = tl.snapshot(m), tl.snapshot(ft)
    ft.fit(x, y, epochs=2, batch_size=4, optimizer=tl.optim.Adam(lr=1e-2), progress=False)
    frozen = tl.assert_frozen(snap, ft)
    assert {"conv.kernel", "bn.moving_mean", "meta_fc.kernel"} <= set(frozen)
    assert {"mix.kernel", "head.out.weight"} <= set(tl.changed_tensors(snap, ft.state()))
    ft.fit((x["image"], x["meta"]), y, epochs=1, batch_size=4, progress=False)  # a tuple, in input order
    tl.assert_frozen(snap, ft)
    assert tl.changed_tensors(original, m.state()) == {}
    full = ft.predict(x)
    np.testing.assert_allclose(ft.predict({k: v[:3] for k, v in x.items()}), full[:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ft.predict(x, batch_size=5), full, rtol=1e-5, atol=1e-6)

    path = os.fspath(tmp_path / "two.safetensors")
    ft.save(path)
    other = two_inputs(seed=7)  # the same architecture, other weights
    assert not np.allclose(tl.finetune(tl.wrap(other), cut=tl.LayerCut(at="mix")).predict(x),
                           tl.finetune(m, cut=tl.LayerCut(at="mix")).predict(x), atol=1e-3)
    again = tl.load(path, model=other)
    assert tl.changed_tensors(ft.state(), again.state()) == {}
    assert again.trainable_mask() == ft.trainable_mask()
    np.testing.assert_array_equal(again.predict(x), full)


def test_bad_inputs_get_named_errors_before_anything_runs():
    ft = tl.finetune(tl.wrap(two_inputs()), cut=tl.LayerCut(at="mix"), head=tl.Head.linear(2))
    x, y = two_input_batch(), np.arange(12) % 2
    snap = tl.snapshot(ft)
    cases = [({"image": x["image"]}, r"missing input\(s\) \['meta'\].*'image'.*'meta'"),
             ({**x, "metta": x["meta"]}, r"unknown key\(s\) \['metta'\]"),
             ((x["image"],), "tuple of 1 array"),
             (x["image"], "is one array.*takes 2 input"),
             ({"image": x["image"][:, :4], "meta": x["meta"]}, r"x\['image'\] has per-sample shape \(4, 8, 3\)")]
    for bad, message in cases:
        with pytest.raises(tl.DataError, match=message):
            ft.fit(bad, y, progress=False)
        with pytest.raises(tl.DataError, match=message):
            ft.predict(bad)
    assert tl.changed_tensors(snap, ft.state()) == {}
    with pytest.raises(tl.LayerNotFoundError, match=r"'mixx'; did you mean 'mix'\? Valid: 'conv', 'bn', 'gap'"):
        tl.finetune(ft, cut=tl.LayerCut(at="mixx"))


def test_a_model_built_on_a_dict_of_inputs_takes_them_by_key():
    ids = keras.Input((6,), dtype="int64", name="input_ids")
    mask = keras.Input((6,), dtype="int64", name="attention_mask")
    tokens = L.Dense(8, name="proj")(L.Embedding(20, 8, name="embed")(ids))
    m = tl.wrap(keras.Model({"input_ids": ids, "attention_mask": mask}, tokens))
    x = token_batch()
    ft = tl.finetune(m, head=tl.Head.linear(2, pool="mean"))
    np.testing.assert_allclose(ft.features(x), pool_reference(m.predict(x), "mean", x["attention_mask"]),
                               rtol=1e-5, atol=1e-6)
    in_key_order = (x["attention_mask"], x["input_ids"])  # Keras' order of a dict of inputs: by key
    np.testing.assert_allclose(ft.predict(in_key_order), ft.predict(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ subclassed, not in sequence
class SkipNet(keras.Model):
    """call() adds a skip connection around ``bn`` (no sequence of layers computes it) and runs
    ``blocks`` from a list; ``scale`` (a numpy value) is not serializable, so Keras cannot re-create
    the model from its config."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.conv = L.Conv2D(4, 3, padding="same", name="conv", kernel_initializer=init.HeUniform(1))
        self.bn = L.BatchNormalization(name="bn")
        self.pool = L.GlobalAveragePooling2D(name="pool")
        self.blocks = [L.Dense(5, activation="relu", name="block0"), L.Dense(5, name="block1")]
        self.fc = L.Dense(3, name="fc")

    def call(self, x, training=None):
        h = self.conv(x)
        h = self.pool(self.bn(h, training=training) + self.scale * h)
        for block in self.blocks:
            h = block(h)
        return self.fc(h)


def skip_net() -> tl.Model:
    return tl.wrap(SkipNet(np.float32(0.5), name="skip"), input_shape=(8, 8, 3))


def images(n: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype(np.float32)


def test_subclassed_model_keras_cannot_recreate_is_cut_by_capturing_a_layers_output():
    m = skip_net()
    model = m.native
    with pytest.raises(NotImplementedError):  # why tlcore copies it from its attributes
        keras.models.clone_model(model)
    assert m.layers == ["conv", "bn", "pool", "block0", "block1", "fc"]
    x = images()
    cut = tl.finetune(m, cut=tl.LayerCut(at="block0"), freeze=tl.FreezePolicy.none())
    assert isinstance(cut.native, CaptureCut) and cut.layers == ["conv", "bn", "pool", "block0"]
    assert list(cut.state()) == [n for n in m.state() if n.split(".")[0] in cut.layers], "the original's names"
    h = model.conv(x)
    manual = model.blocks[0](model.pool(model.bn(h, training=False) + 0.5 * h))
    np.testing.assert_allclose(cut.predict(x), manual.numpy(), rtol=1e-5, atol=1e-6)
    body = cut.native.body
    assert body is not model and body.conv is not model.conv and body.conv.kernel is not model.conv.kernel
    assert isinstance(body.blocks[1], Dropped) and isinstance(body.fc, Dropped), "layers after the cut are removed"
    assert len(cut.native.weights) == len(cut.state()), "no weight of a removed layer is left"


def test_subclassed_model_cut_by_capture_takes_a_head_trains_and_leaves_the_original_untouched():
    m = skip_net()
    original = tl.snapshot(m)
    ft = tl.finetune(m, cut=tl.LayerCut(at="bn"), head=tl.Head.linear(2), freeze=tl.FreezePolicy.up_to("conv"))
    assert ft.layers == ["conv", "bn", "head", "head.pool", "head.out"]
    x, y = images(), np.arange(12) % 2
    model = m.native
    h = model.conv(x)
    np.testing.assert_allclose(ft.features(x), model.bn(h, training=False).numpy().mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)  # bn's output (before the skip connection), pooled
    snap = tl.snapshot(ft)
    ft.fit(x, y, epochs=2, batch_size=4, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9), progress=False)
    assert set(tl.assert_frozen(snap, ft)) == {"conv.kernel", "conv.bias"}
    assert {"bn.gamma", "bn.moving_mean", "head.out.weight"} <= set(tl.changed_tensors(snap, ft.state()))
    assert tl.changed_tensors(original, m.state()) == {}
    np.testing.assert_allclose(ft.predict(x[:5]), ft.predict(x)[:5], rtol=1e-5, atol=1e-6)

    frozen = tl.finetune(m, cut=tl.LayerCut(at="pool"), head=tl.Head.mlp(hidden=(4,), num_classes=2, dropout=0.2))
    snap = tl.snapshot(frozen)
    assert frozen.fit(x, y, epochs=2, batch_size=4, progress=False).info["cache_features"] == "used"
    tl.assert_frozen(snap, frozen)
    np.testing.assert_allclose(frozen.head_model().predict(frozen.features(x)), frozen.predict(x), rtol=1e-5, atol=1e-6)
    whole = tl.finetune(m, freeze=tl.FreezePolicy.none())  # no cut: an independent copy all the same
    whole.fit(x, y % 3, epochs=1, batch_size=4, progress=False)
    assert "fc.kernel" in tl.changed_tensors(original, whole.state())
    assert tl.changed_tensors(original, m.state()) == {}


class Classifier(keras.Model):
    """The usual way to put a head on a pretrained Keras model: the backbone is an argument (so Keras
    cannot re-create the model from its config) and a functional graph far too deep to copy
    attribute by attribute."""

    def __init__(self, backbone: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.gap = L.GlobalAveragePooling2D(name="gap")
        self.fc = L.Dense(3, name="fc")

    def call(self, x, training=None):
        features = self.backbone(x, training=training)
        return self.fc(self.gap(features) + 0.0 * self.gap(features))  # gap runs twice: not a sequence


def test_subclassed_model_around_a_pretrained_backbone_is_copied_cut_and_trained():
    backbone = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, include_top=False)
    m = tl.wrap(Classifier(backbone, name="clf"), input_shape=(32, 32, 3))
    assert m.layers[0] == "MobileNetV3Small" and m.layers[-2:] == ["gap", "fc"]
    original = tl.snapshot(m)
    ft = tl.finetune(m, cut=tl.LayerCut(at="gap"), head=tl.Head.linear(2))
    copied = ft.native.body.body.backbone
    assert copied is not backbone and copied.get_layer("conv").kernel is not backbone.get_layer("conv").kernel
    x = np.random.default_rng(0).uniform(0, 255, size=(4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(ft.features(x), backbone(x, training=False).numpy().mean(axis=(1, 2)),
                               rtol=1e-4, atol=1e-5)
    snap = tl.snapshot(ft)
    assert ft.fit(x, np.arange(4) % 2, batch_size=2, progress=False).info["cache_features"] == "used"
    tl.assert_frozen(snap, ft)
    inner = tl.finetune(m, cut=tl.LayerCut(at="MobileNetV3Small.expanded_conv_2_add"))  # inside the backbone
    np.testing.assert_allclose(inner.predict(x), keras.Model(backbone.input, backbone.get_layer(
        "expanded_conv_2_add").output)(x, training=False).numpy(), rtol=1e-4, atol=1e-5)
    assert tl.changed_tensors(original, m.state()) == {}


# ------------------------------------------------------------------------------------ the user's own head
def test_native_keras_head_is_attached_as_is_trains_and_round_trips(tmp_path):
    base = BACKEND.reference_model(seed=0)
    ft = tl.finetune(base, cut=tl.LayerCut(at="pool"), head=L.Dense(3, name="mine"))
    assert ft.layers[-2:] == ["pool", "head"] and ft.head == "head"
    assert [n for n in ft.state() if n.startswith("head.")] == ["head.kernel", "head.bias"]
    assert ft.trainable_mask()["head.kernel"] and not ft.trainable_mask()["conv1.kernel"]
    x, y = sample_data(ft, n=24)
    features = ft.features(x)
    np.testing.assert_allclose(features, tl.finetune(base, cut=tl.LayerCut(at="pool")).predict(x), rtol=1e-5, atol=1e-6)
    snap = tl.snapshot(ft)
    assert ft.fit(x, y, epochs=2, batch_size=8, progress=False).info["cache_features"] == "used"
    tl.assert_frozen(snap, ft)
    assert set(tl.changed_tensors(snap, ft.state())) == {"head.kernel", "head.bias"}
    np.testing.assert_allclose(ft.head_model().predict(ft.features(x)), ft.predict(x), rtol=1e-5, atol=1e-6)
    path = os.fspath(tmp_path / "native_head.safetensors")
    ft.save(path)
    with pytest.raises(tl.CheckpointError, match="own head module"):
        tl.load(path, model=BACKEND.reference_model(seed=0).native)
    again = tl.load(path, model=BACKEND.reference_model(seed=3).native, head=L.Dense(3))
    np.testing.assert_array_equal(again.predict(x), ft.predict(x))


def test_native_head_takes_token_features_unpooled_and_foreign_heads_are_refused():
    base = BACKEND.reference_model(seed=0, variant="tokens")
    head = keras.Sequential([L.GlobalAveragePooling1D(name="avg"), L.Dense(2, name="out")])
    ft = tl.finetune(base, head=head)
    x = token_batch()
    assert ft.layers[-3:] == ["head", "head.avg", "head.out"]
    np.testing.assert_allclose(ft.features(x), base.predict(x), rtol=1e-6, atol=1e-6)  # (N, 6, 8), no pool
    assert ft.predict(x).shape == (len(x["input_ids"]), 2)
    for foreign in (object(), lambda t: t, np.zeros(3)):
        with pytest.raises(tl.UnsupportedModelError, match="keras.layers.Layer"):
            tl.finetune(base, head=foreign)


# ------------------------------------------------------------------------------------ pools
def token_batch(n: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids in [1, 20) and an attention mask keeping a different prefix of each row (at least one)."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(6)[None, :] < rng.integers(1, 7, size=(n, 1))).astype(np.int64)
    mask[0] = 1  # one full row
    return {"input_ids": rng.integers(1, 20, size=(n, 6)), "attention_mask": mask}


@pytest.mark.parametrize("pool", POOLS)
def test_each_pool_matches_the_numpy_reference_with_and_without_a_mask(pool):
    base = BACKEND.reference_model(seed=0, variant="tokens")
    x = token_batch()
    tokens = base.predict(x)
    masked = tl.finetune(base, head=tl.Head.linear(3, pool=pool))
    expected = pool_reference(tokens, pool, x["attention_mask"])
    np.testing.assert_allclose(masked.features(x), expected, rtol=1e-5, atol=1e-6)
    ids_only = keras.Model(base.native.inputs[0], base.native.output)  # the same layers, no attention_mask input
    unmasked = tl.finetune(ids_only, head=tl.Head.linear(3, pool=pool))
    plain = pool_reference(tokens, pool)
    np.testing.assert_allclose(unmasked.features(x["input_ids"]), plain, rtol=1e-5, atol=1e-6)
    assert np.allclose(expected, plain) is (pool in ("avg", "flatten", "cls")), "the mask matters to max, mean, last"
    for ft, feats in ((masked, expected), (unmasked, plain)):
        state = ft.state()
        logits = feats @ state["head.out.weight"].T.astype(np.float64) + state["head.out.bias"]
        np.testing.assert_allclose(ft.predict(x if ft is masked else x["input_ids"]), logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", ["avg", "max", "flatten"])
def test_image_pools_match_the_numpy_reference(pool):
    base = BACKEND.reference_model(seed=0)
    x = images(5)
    nhwc = tl.finetune(base, cut=tl.LayerCut(at="relu2")).predict(x)
    ft = tl.finetune(base, cut=tl.LayerCut(at="relu2"), head=tl.Head.linear(3, pool=pool))
    np.testing.assert_allclose(ft.features(x), pool_reference(nhwc, pool, channels_last=True), rtol=1e-5, atol=1e-6)
    for token_only in ("mean", "cls", "last"):
        with pytest.raises(tl.HeadError, match="token features"):
            tl.finetune(base, cut=tl.LayerCut(at="relu2"), head=tl.Head.linear(3, pool=token_only))


def test_a_mask_keras_attaches_itself_reaches_the_pool():
    """Embedding(mask_zero=True) masks token id 0: the pool honours it as an attention mask."""
    ids = keras.Input((6,), dtype="int64", name="input_ids")
    out = L.Dense(8, name="proj")(L.Embedding(20, 8, mask_zero=True, name="embed")(ids))
    m = tl.wrap(keras.Model(ids, out))
    x = token_batch()
    padded = x["input_ids"] * x["attention_mask"]
    ft = tl.finetune(m, head=tl.Head.linear(2, pool="mean"))
    np.testing.assert_allclose(ft.features(padded), pool_reference(m.predict(padded), "mean", padded > 0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ft.head_model().predict(ft.features(padded)), ft.predict(padded), rtol=1e-5, atol=1e-6)


class DictEncoder(keras.Model):
    """A subclassed model on a dict batch; it records the dtype of the ids it is called with."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = L.Embedding(20, 8, name="embed")
        self.proj = L.Dense(8, name="proj")
        self.cls = L.Dense(2, name="cls")
        self.seen: list = []

    def call(self, inputs, training=None):
        self.seen.append(inputs["input_ids"].dtype)
        h = self.proj(self.embed(inputs["input_ids"]))
        return self.cls(tf.reduce_mean(h * tf.cast(inputs["attention_mask"], h.dtype)[..., None], axis=1))


def test_token_ids_stay_integers_and_a_subclassed_dict_model_pools_with_its_mask():
    encoder = DictEncoder(name="encoder")
    x, y = token_batch(), np.arange(10) % 3
    encoder(x)
    ft = tl.finetune(tl.wrap(encoder), cut=tl.LayerCut(at="proj"), head=tl.Head.linear(3, pool="last"),
                     freeze=tl.FreezePolicy.none())
    body = ft.native
    while not isinstance(body, DictEncoder):
        body = body.body
    body.seen.clear()
    tokens = encoder.proj(encoder.embed(x["input_ids"])).numpy()
    expected = pool_reference(tokens, "last", x["attention_mask"])
    np.testing.assert_allclose(ft.features(x), expected, rtol=1e-5, atol=1e-6)
    snap = tl.snapshot(ft)
    ft.fit(x, y, epochs=2, batch_size=4, progress=False)
    assert {"embed.embeddings", "proj.kernel", "head.out.weight"} <= set(tl.changed_tensors(snap, ft.state()))
    assert body.seen and {d for d in body.seen} == {tf.int64}, "predict and fit pass the ids as int64"
    tokens_model = BACKEND.reference_model(seed=0, variant="tokens")
    assert tokens_model.native.inputs[0].dtype == "int64"
    with pytest.raises(tl.DataError, match=r"missing input\(s\) \['attention_mask'\]"):
        tokens_model.predict({"input_ids": x["input_ids"]})


# ------------------------------------------------------------------------------------ mixed precision
def step_dtypes(ft: tl.Model) -> set:
    """The dtypes computed by the compiled training step(s) of ``ft``'s last fit."""
    trainer = next(reversed(ft._trainers.values()))
    return {out.dtype for step in trainer._steps.values() for op in step.fn.graph.get_operations()
            for out in op.outputs}


@pytest.mark.parametrize("precision, dtype", [("bfloat16", tf.bfloat16), ("float16", tf.float16)])
def test_mixed_precision_trains_in_16_bits_on_float32_weights(precision, dtype):
    ft = reference_finetune("keras", tl.FreezePolicy.up_to("bn1"))
    x, y = sample_data(ft, n=32)
    snap = tl.snapshot(ft)
    hist = ft.fit(x, y, epochs=2, batch_size=8, cache_features=False, progress=False, precision=precision)
    assert np.isfinite(hist["loss"]).all()
    assert dtype in step_dtypes(ft), "the step computes in 16 bits"
    assert set(tl.assert_frozen(snap, ft)) == {"conv1.kernel", "conv1.bias", "bn1.gamma", "bn1.beta",
                                               "bn1.moving_mean", "bn1.moving_variance"}
    assert {"conv2.kernel", "bn2.moving_mean", "head.out.weight"} <= set(tl.changed_tensors(snap, ft.state()))
    assert {v.dtype for v in ft.native.variables if "seed" not in v.name} == {"float32"}, "float32 master weights"
    assert {layer.dtype_policy.name for layer in flatten_layers(ft.native)} == {"float32"}, "policies restored"
    out = ft.predict(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ft.native(x, training=False).numpy(), rtol=1e-6, atol=1e-6)  # predict is float32
    trainer = next(reversed(ft._trainers.values()))
    assert (trainer.scaler is not None) is (precision == "float16"), "float16 scales its loss"
    if trainer.scaler is not None:
        assert float(trainer.scaler.dynamic_scale.numpy()) == 2.0 ** 15  # no overflow in 8 steps


def test_float32_step_has_no_16_bit_computation_and_cached_heads_train_in_bfloat16():
    ft = reference_finetune("keras", tl.FreezePolicy.up_to("bn1"))
    x, y = sample_data(ft, n=16)
    ft.fit(x, y, batch_size=8, cache_features=False, progress=False)
    assert not step_dtypes(ft) & {tf.bfloat16, tf.float16}, "negative control"
    cached = reference_finetune("keras")
    snap = tl.snapshot(cached)
    hist = cached.fit(x, y, batch_size=8, progress=False, precision="bfloat16")
    assert hist.info["cache_features"] == "used"
    tl.assert_frozen(snap, cached)
    assert "head.out.weight" in tl.changed_tensors(snap, cached.state())
    assert cached.state()["head.out.weight"].dtype == np.float32


class Inverse(L.Layer):
    """A layer whose operation has no bfloat16 version in TensorFlow (matrix inverse)."""

    def call(self, x):
        square = tf.reshape(x, (-1, 2, 2)) + 3 * tf.eye(2, dtype=x.dtype)
        return tf.reshape(tf.linalg.inv(square), (-1, 4))


def test_a_precision_the_model_cannot_compute_in_is_refused_with_a_named_error():
    inputs = keras.Input((4,))
    m = tl.wrap(keras.Model(inputs, L.Dense(3, name="fc")(Inverse(name="inv")(L.Dense(4, name="a")(inputs)))))
    x, y = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), np.arange(8) % 3
    snap = tl.snapshot(m)
    with pytest.raises(PrecisionNotSupportedError, match=r"precision='bfloat16' is not possible.*bfloat16.*float32"):
        m.fit(x, y, progress=False, precision="bfloat16")
    assert issubclass(PrecisionNotSupportedError, tl.OptimizerConfigError)
    assert tl.changed_tensors(snap, m.state()) == {}
    # the same model computes in float16; a few steps, as Keras' loss scaler skips a step whose scaled
    # gradients overflow float16 (its initial scale is 2**15), which one step alone may be
    hist = m.fit(x, y, progress=False, precision="float16", epochs=5)
    assert hist.info["steps"] == 5 and tl.changed_tensors(snap, m.state())


# ------------------------------------------------------------------------------------ drop_last
def test_drop_last_removes_a_whole_multi_layer_classifier():
    app = keras.applications.MobileNetV3Small(include_top=True, weights=None, input_shape=(32, 32, 3))
    m = tl.wrap(app)
    assert m.layers[-3:] == ["logits", "flatten", "predictions"]  # conv 1x1, then two layers without weights
    ft = tl.finetune(m, cut=tl.LayerCut(drop_last=1))
    assert ft.layers == m.layers[: m.layers.index("logits")] and ft.layers[-1] == "dropout"
    assert not any(n.startswith("logits.") for n in ft.state())
    assert ft.predict(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 1, 1, 1024)
    assert tl.finetune(m, cut=tl.LayerCut(at=-2)).layers == ft.layers, "an index counts the same units"
