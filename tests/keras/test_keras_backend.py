"""What only the Keras backend has: functional, nested and subclassed models, Keras' trainable flags,
optimizers with PyTorch's exact rules, and heads on NHWC and token features."""
import numpy as np
import pytest

import tlcore as tl
from tlcore.testing import example_shape, reference_finetune, sample_data, selected_backends

if "keras" not in selected_backends():
    pytest.skip("keras is not in TLCORE_TEST_BACKENDS", allow_module_level=True)

BACKEND = tl.get_backend("keras")  # before `import keras`: makes Keras run on TensorFlow

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

try:  # the conftest imports torch before tensorflow, as one process needs
    import torch
except ImportError:  # pragma: no cover
    torch = None
from tlcore_keras import freeze as kfreeze  # noqa: E402
from tlcore_keras import train as ktrain  # noqa: E402

L = keras.layers


def conv_block(name: str, channels: int = 4) -> keras.Model:
    """A functional model used as a layer: conv -> bn -> relu."""
    inputs = keras.Input((8, 8, channels))
    x = L.Conv2D(channels, 3, padding="same", name="conv", bias_initializer="ones")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, L.ReLU(name="relu")(x), name=name)


def nested_functional() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 1, name="stem")(inputs)
    x = conv_block("block")(x)
    x = keras.Sequential([L.Conv2D(4, 1, name="mix"), L.ReLU(name="act")], name="tail")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(2, name="fc")(x), name="nested")


def images(n: int = 6, shape=(8, 8, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


# ------------------------------------------------------------------------------------ structure
def test_reference_state_names_kinds_and_units():
    m = BACKEND.reference_model(seed=0)
    infos = {t.name: t for t in m.tensors}
    assert list(infos)[:6] == ["conv1.kernel", "conv1.bias", "bn1.gamma", "bn1.beta", "bn1.moving_mean",
                               "bn1.moving_variance"]
    assert infos["bn2.moving_variance"].kind == "bn_stat" and infos["bn2.gamma"].kind == "bn_param"
    assert infos["bn2.gamma"].unit == "bn2" and infos["conv2.kernel"].unit == ""
    assert infos["dropout.seed_generator_state"].kind == "rng"
    assert infos["fc.kernel"].kind == "param" and infos["fc.kernel"].layer == "fc"
    assert m.input_shape == (8, 8, 3) and m.native.inputs[0].shape[1:] == (8, 8, 3)  # NHWC


def test_reference_model_is_seeded():
    a, b, c = (BACKEND.reference_model(seed=s).state() for s in (0, 0, 1))
    assert tl.changed_tensors(a, b) == {}
    assert "conv1.kernel" in tl.changed_tensors(a, c)


def test_nested_models_are_listed_and_cut_at_dotted_names():
    model = nested_functional()
    m = tl.wrap(model)
    assert m.layers == ["stem", "block", "block.conv", "block.bn", "block.relu", "tail", "tail.mix",
                        "tail.act", "pool", "fc"]
    assert "block.bn.moving_mean" in m.state() and "tail.mix.kernel" in m.state()
    x = images()
    stem, block, tail = (model.get_layer(n) for n in ("stem", "block", "tail"))
    expected = {"block.bn": block.get_layer("bn")(block.get_layer("conv")(stem(x)), training=False),
                "tail.mix": tail.get_layer("mix")(block(stem(x), training=False))}
    for at, out in expected.items():
        cut = tl.finetune(m, cut=tl.LayerCut(at=at), freeze=tl.FreezePolicy.none())
        assert cut.layers == m.layers[: m.layers.index(at) + 1]
        np.testing.assert_allclose(cut.predict(x), out.numpy(), rtol=1e-5, atol=1e-6)
    assert m.native is model


def test_cut_copies_and_training_the_copy_leaves_the_original_untouched():
    model = nested_functional()
    m = tl.wrap(model)
    layers_before = {layer.name: len(layer._inbound_nodes) for layer in model.layers}
    snap = tl.snapshot(m)
    ft = tl.finetune(m, cut=tl.LayerCut(at="block.bn"), head=tl.Head.linear(2), freeze=tl.FreezePolicy.none())
    x, y = images(16), np.arange(16) % 2
    ft.fit(x, y, epochs=2, batch_size=8, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9), progress=False)
    assert tl.changed_tensors(snap, m.state()) == {}
    assert "block.bn.moving_mean" in tl.changed_tensors(snap, ft.state(), ["block.bn.moving_mean"])
    assert {layer.name: len(layer._inbound_nodes) for layer in model.layers} == layers_before


def test_sequential_inside_sequential():
    inner = keras.Sequential([L.Dense(5, name="a"), L.ReLU(name="r"), L.Dense(4, name="b")], name="inner")
    model = keras.Sequential([keras.Input((3,)), L.Dense(6, name="first"), inner, L.Dense(2, name="last")])
    m = tl.wrap(model)
    assert m.layers == ["first", "inner", "inner.a", "inner.r", "inner.b", "last"]
    cut = tl.finetune(m, cut=tl.LayerCut(at="inner.r"))
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    expected = inner.get_layer("r")(inner.get_layer("a")(model.get_layer("first")(x))).numpy()
    np.testing.assert_allclose(cut.predict(x), expected, rtol=1e-6)
    assert list(cut.state()) == ["first.kernel", "first.bias", "inner.a.kernel", "inner.a.bias"]


def test_unknown_dotted_layer_suggests_the_closest_one():
    m = tl.wrap(nested_functional())
    with pytest.raises(tl.LayerNotFoundError, match="did you mean 'block.bn'"):
        tl.finetune(m, cut=tl.LayerCut(at="block.bnn"))


def test_unbuilt_model_needs_an_input_shape():
    model = keras.Sequential([L.Dense(4, name="a"), L.Dense(2, name="b")])
    with pytest.raises(tl.UnsupportedModelError, match="input_shape"):
        tl.wrap(model)
    m = tl.wrap(model, input_shape=(3,))
    assert m.layers == ["a", "b"] and list(m.state()) == ["a.kernel", "a.bias", "b.kernel", "b.bias"]
    assert m.predict(np.ones((2, 3), np.float32)).shape == (2, 2)


# ------------------------------------------------------------------------------------ subclassed
class Chain(keras.Model):
    """A subclassed model whose layers run one after another."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(4, 3, padding="same", name="conv")
        self.bn = L.BatchNormalization(name="bn")
        self.pool = L.GlobalAveragePooling2D(name="pool")
        self.fc = L.Dense(3, name="fc")

    def call(self, x, training=None):
        return self.fc(self.pool(self.bn(self.conv(x), training=training)))


class Residual(Chain):
    """Same layers, but call() adds a skip connection: no sequence of layers computes it."""

    def call(self, x, training=None):
        h = self.conv(x)
        return self.fc(self.pool(self.bn(h, training=training) + h))


def test_subclassed_model_running_in_sequence_is_cut_at_top_level_layers():
    model = Chain(name="chain")
    m = tl.wrap(model, input_shape=(8, 8, 3))
    assert m.layers == ["conv", "bn", "pool", "fc"]
    x = images()
    cut = tl.finetune(m, cut=tl.LayerCut(at="bn"), freeze=tl.FreezePolicy.none())
    np.testing.assert_allclose(cut.predict(x), model.bn(model.conv(x), training=False).numpy(), rtol=1e-5, atol=1e-6)
    ft = tl.finetune(m, cut=tl.LayerCut(at="pool"), head=tl.Head.linear(2))
    snap, original = tl.snapshot(ft), tl.snapshot(m)
    ft.fit(x, np.arange(6) % 2, epochs=2, batch_size=3, progress=False)
    assert tl.assert_frozen(snap, ft) and tl.changed_tensors(snap, ft.state(), ["head.out.weight"])
    assert tl.changed_tensors(original, m.state()) == {}


def test_subclassed_model_with_a_skip_connection_trains_whole_and_is_cut_by_capture():
    model = Residual(name="residual")
    m = tl.wrap(model, input_shape=(8, 8, 3))
    x, y = images(12), np.arange(12) % 3
    whole = tl.finetune(m, freeze=tl.FreezePolicy.up_to("bn"))  # no cut: copied whole, from its config
    snap = tl.snapshot(whole)
    whole.fit(x, y, epochs=1, batch_size=4, progress=False)
    assert set(tl.assert_frozen(snap, whole)) == {"conv.kernel", "conv.bias", "bn.gamma", "bn.beta",
                                                   "bn.moving_mean", "bn.moving_variance"}
    assert tl.changed_tensors(snap, whole.state(), ["fc.kernel"])
    # no sequence of layers computes it, so the cut runs its call() and takes bn's output
    cut = tl.finetune(m, cut=tl.LayerCut(at="bn"))
    assert cut.layers == ["conv", "bn"] and list(cut.state())[-1] == "bn.moving_variance"
    np.testing.assert_allclose(cut.predict(x), model.bn(model.conv(x), training=False).numpy(), rtol=1e-5, atol=1e-6)
    headed = tl.finetune(m, head=tl.Head.linear(2))  # a head after the whole model (after its skip connection)
    assert headed.layers[-3:] == ["head", "head.pool", "head.out"]
    h = model.conv(x)
    np.testing.assert_allclose(headed.features(x), model.fc(model.pool(model.bn(h, training=False) + h)).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_subclassed_model_without_input_shape_is_cut_by_capture_and_sizes_its_head_on_data():
    model = Chain(name="chain")
    model(np.zeros((1, 8, 8, 3), np.float32))  # built, but Keras keeps no input shape for it
    m = tl.wrap(model)
    assert m.layers == ["conv", "bn", "pool", "fc"] and len(m.state()) == 8
    x = images()
    cut = tl.finetune(m, cut=tl.LayerCut(at="bn"))  # without a recorded forward pass: captured
    np.testing.assert_allclose(cut.predict(x), model.bn(model.conv(x), training=False).numpy(), rtol=1e-5, atol=1e-6)
    ft = tl.finetune(m, cut=tl.LayerCut(at="pool"), head=tl.Head.linear(2))
    assert not ft.head_built, "the width of the head's input is not known without data"
    with pytest.raises(tl.HeadNotBuiltError, match="first batch"):
        ft.state()
    assert ft.predict(x).shape == (6, 2) and ft.state()["head.out.weight"].shape == (2, 4)


# ------------------------------------------------------------------------------------ freezing
@pytest.mark.parametrize("policy", [tl.FreezePolicy.all(), tl.FreezePolicy.up_to("bn1"),
                                    tl.FreezePolicy.matching(r"kernel$"), tl.FreezePolicy.all(bn="train"),
                                    tl.FreezePolicy.none()])
def test_keras_trainable_flags_tell_the_same_as_the_mask(policy):
    ft = reference_finetune("keras", policy)
    mask, kinds = ft.trainable_mask(), {t.name: t.kind for t in ft.tensors}
    by_id = {id(t.variable): t.name for t in ft._tensors}
    keras_trainable = {by_id[id(v)] for v in ft.native.trainable_variables}
    assert keras_trainable == {n for n, t in mask.items() if t and kinds[n] in ("param", "bn_param")}
    for unit in ("bn1", "bn2"):
        bn_frozen = not mask[f"{unit}.moving_mean"]
        assert ft.native.get_layer(unit).trainable is not bn_frozen  # frozen BN runs in inference mode


def test_refreezing_after_unfreeze_reaches_keras_flags():
    """Regression: ``model.trainable = True`` on an already-trainable model is a no-op on the
    TensorFlow backend (``self.x = self.x`` short-circuit), so frozen layers below stayed frozen."""
    ft = reference_finetune("keras")
    bn = ft.native.get_layer("bn1")
    assert not bn.trainable
    ft.native.trainable = True  # what the pitfall looks like: nothing changes below
    assert not bn.trainable, "Keras changed: plain assignment now propagates (the regression is moot)"
    ft.freeze(tl.FreezePolicy.none())
    assert bn.trainable and all(v.trainable for v in bn.trainable_weights)
    kfreeze.set_trainable(ft.native, True)
    ft.freeze(tl.FreezePolicy.all())
    assert not bn.trainable and ft.native.get_layer("head").trainable


def test_each_fit_traces_its_step_once_for_the_current_trainable_set():
    ktrain.clear_cache()  # steps of its own (a model of the same structure traced before would share them)
    ft = reference_finetune("keras")
    x, y = sample_data(ft, n=40)  # 16 + 16 + 8: the short last batch must not retrace
    first = ft.fit(x, y, batch_size=16, progress=False, cache_features=False)
    assert first.info["compilations"] == 1
    ft.freeze(tl.FreezePolicy.none())
    snap = tl.snapshot(ft)
    second = ft.fit(x, y, batch_size=16, progress=False, cache_features=False)
    assert second.info["compilations"] == 1
    assert "conv1.kernel" in tl.changed_tensors(snap, ft.state()), "the new step must train the unfrozen base"
    again = tl.snapshot(ft)
    third = ft.fit(x, y, batch_size=16, progress=False, cache_features=False)
    assert third.info["compilations"] == 0, "same policy and optimizer: the compiled step is reused"
    assert "conv1.kernel" in tl.changed_tensors(again, ft.state())


def test_reused_step_restarts_optimizer_state_and_seeds():
    """A reused compiled step started afresh (``reset=True``) must train exactly like a fresh one
    (state zeroed, dropout reseeded)."""
    x, y = sample_data(reference_finetune("keras"), n=40)
    kw = dict(batch_size=16, optimizer=tl.optim.Adam(lr=1e-2), progress=False, cache_features=False, seed=5)
    warm = reference_finetune("keras", tl.FreezePolicy.up_to("bn1"))
    warm.fit(x, y, **kw)
    start = tl.snapshot(warm)
    assert warm.fit(x, y, reset=True, **kw).info["compilations"] == 0
    ktrain.clear_cache()  # a trace of its own: a model of the same structure would share warm's step
    fresh = reference_finetune("keras", tl.FreezePolicy.up_to("bn1"))
    fresh.load_state(start)
    assert fresh.fit(x, y, **kw).info["compilations"] == 1
    assert tl.changed_tensors(warm.state(), fresh.state()) == {}


def test_trainable_flags_changed_behind_tlcores_back_are_refused():
    ft = reference_finetune("keras")
    x, y = sample_data(ft)
    ft.native.get_layer("conv1").trainable = True  # the mask still says frozen
    snap = tl.snapshot(ft)
    with pytest.raises(tl.FreezePolicyError, match=r"conv1\.kernel.*model\.freeze"):
        ft.fit(x, y, progress=False, cache_features=False)
    assert tl.changed_tensors(snap, ft.state()) == {}
    ft.freeze(tl.FreezePolicy.all())  # the way to change what trains: flags are set again from the mask
    ft.fit(x, y, progress=False, cache_features=False)
    tl.assert_frozen(snap, ft)


def test_optimizer_state_bytes_cover_only_trainable_weights():
    ft = reference_finetune("keras")
    trainable = ft.trainable_variables()
    trainer = ft._make_trainer(tl.optim.TrainSpec(tl.optim.Adam(lr=1e-3)))
    moments = 2 * sum(int(np.prod(v.shape)) * 4 for v in trainable)
    # int64 iterations + float32 learning rate + an int64 step offset per tensor (per-tensor step counts)
    assert trainer.optimizer_state_bytes() == moments + 8 + 4 + 8 * len(trainable)
    assert len(trainable) == 4  # head.fc0 and head.out kernels and biases


# ------------------------------------------------------------------------------------ optimizers
needs_torch = pytest.mark.skipif(torch is None, reason="comparing with torch.optim needs torch")

TORCH_OPTIMIZERS = {
    "sgd_nesterov_l2": (tl.optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
                        lambda p, s: torch.optim.SGD(p, lr=s.lr, momentum=s.momentum, nesterov=True,
                                                     weight_decay=s.weight_decay)),
    "sgd_plain": (tl.optim.SGD(lr=0.1), lambda p, s: torch.optim.SGD(p, lr=s.lr)),
    "adam_l2": (tl.optim.Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
                lambda p, s: torch.optim.Adam(p, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)),
    "adamw": (tl.optim.AdamW(lr=0.01, weight_decay=0.5),
              lambda p, s: torch.optim.AdamW(p, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)),
    "rmsprop_centered_momentum_l2": (
        tl.optim.RMSprop(lr=0.01, alpha=0.9, eps=1e-6, momentum=0.5, centered=True, weight_decay=0.1),
        lambda p, s: torch.optim.RMSprop(p, lr=s.lr, alpha=s.alpha, eps=s.eps, momentum=s.momentum,
                                         centered=True, weight_decay=s.weight_decay)),
    "rmsprop_plain": (tl.optim.RMSprop(lr=0.01), lambda p, s: torch.optim.RMSprop(p, lr=s.lr)),
}

GRADS = [np.random.default_rng(i).normal(size=(3, 4)).astype(np.float32) * (i + 1) for i in range(4)]
W0 = np.random.default_rng(9).normal(size=(3, 4)).astype(np.float32)


def run_keras(optimizer, clip=None) -> np.ndarray:
    w = keras.Variable(W0.copy(), name="w")
    optimizer.build([w])
    for g in GRADS:
        optimizer.apply([tf.constant(g)], [w])
    return w.numpy()


def run_torch(make, spec, clip=None) -> np.ndarray:
    w = torch.nn.Parameter(torch.from_numpy(W0.copy()))
    opt = make([w], spec)
    for g in GRADS:
        w.grad = torch.from_numpy(g.copy())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([w], clip)
        opt.step()
    return w.detach().numpy()


@needs_torch
@pytest.mark.parametrize("name", list(TORCH_OPTIMIZERS))
def test_optimizers_follow_torch_optim_exactly(name):
    spec, make = TORCH_OPTIMIZERS[name]
    expected = run_torch(make, spec)
    assert not np.allclose(expected, W0, atol=1e-3), "the steps must move the weights"
    np.testing.assert_allclose(run_keras(ktrain.build_optimizer(spec)), expected, rtol=2e-5, atol=1e-6)


@needs_torch
def test_clip_grad_norm_follows_torch():
    spec, make = TORCH_OPTIMIZERS["sgd_plain"]
    expected = run_torch(make, spec, clip=0.5)
    np.testing.assert_allclose(run_keras(ktrain.build_optimizer(spec, clip_grad_norm=0.5)), expected,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, run_torch(make, spec), atol=1e-3), "clipping must matter here"


@needs_torch
def test_keras_builtin_adam_and_rmsprop_differ_from_the_spec():
    """Negative control: why the backend has its own update rules (eps placement differs)."""
    cases = [(tl.optim.Adam(lr=0.01, betas=(0.8, 0.99), eps=0.1), keras.optimizers.Adam(0.01, 0.8, 0.99, 0.1),
              lambda p, s: torch.optim.Adam(p, lr=s.lr, betas=s.betas, eps=s.eps)),
             (tl.optim.RMSprop(lr=0.01, eps=0.1), keras.optimizers.RMSprop(0.01, rho=0.99, epsilon=0.1),
              lambda p, s: torch.optim.RMSprop(p, lr=s.lr, eps=s.eps))]
    for spec, builtin, make in cases:
        expected = run_torch(make, spec)
        assert not np.allclose(run_keras(builtin), expected, rtol=1e-4, atol=1e-5), spec
        np.testing.assert_allclose(run_keras(ktrain.build_optimizer(spec)), expected, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ heads
def test_head_on_token_features_averages_over_tokens():
    inputs = keras.Input((5, 12))
    model = keras.Model(inputs, L.Dense(16, name="proj")(inputs))
    ft = tl.finetune(model, head=tl.Head.mlp(hidden=(8,), num_classes=3, dropout=0.2))
    assert ft.layers == ["proj", "head", "head.pool", "head.fc0", "head.act0", "head.drop0", "head.out"]
    assert ft.state()["head.fc0.weight"].shape == (8, 16), "PyTorch's (out, in) layout, as on every backend"
    x = np.random.default_rng(0).normal(size=(4, 5, 12)).astype(np.float32)
    pooled = ft.native.get_layer("head").get_layer("pool")(model(x)).numpy()
    np.testing.assert_allclose(pooled, model(x).numpy().mean(axis=1), rtol=1e-5, atol=1e-6)
    assert ft.predict(x).shape == (4, 3)


def test_flatten_head_on_nhwc_features():
    m = BACKEND.reference_model(seed=0)
    ft = tl.finetune(m, cut=tl.LayerCut(at="relu2"), head=tl.Head.linear(5, pool="flatten"))
    assert ft.state()["head.out.weight"].shape == (5, 8 * 8 * 16)
    assert ft.predict(images(3)).shape == (3, 5)


def test_cached_features_are_the_frozen_part_in_inference_mode():
    ft = reference_finetune("keras")
    x = images(5)
    h = x
    for name in ("conv1", "bn1", "relu1", "conv2", "bn2", "relu2"):
        h = ft.native.get_layer(name)(h, training=False)
    pooled = h.numpy().mean(axis=(1, 2))  # the head's first layer, weightless, is applied too
    np.testing.assert_allclose(ft._features(x), pooled, rtol=1e-5, atol=1e-6)
    head = ft._head_model()
    assert head.layers == ["fc0", "act0", "drop0", "out"] and head.input_shape == (16,)
    inside = {t.name: t.variable for t in ft._tensors}
    assert all(t.variable is inside[f"head.{t.name}"] for t in head._tensors), "the head shares its weights"
    np.testing.assert_allclose(head.predict(ft._features(x)), ft.predict(x), rtol=1e-5, atol=1e-6)
    assert ft._stochastic_layers() == ["head.drop0"]


# ------------------------------------------------------------------------------------ zoo
def test_zoo_state_uses_pytorch_names_and_layouts():
    m = tl.zoo.create("resnet18", backend="keras", input_size=32, width=4, num_classes=3)
    state = m.state()
    assert state["conv1.weight"].shape == (4, 3, 7, 7) and state["fc.weight"].shape == (3, 32)
    assert "layer2.0.downsample.1.running_var" in state and "layer1.0.bn2.bias" in state
    kernel = m.native.get_layer("conv1").kernel.numpy()  # Keras keeps (kh, kw, in, out)
    np.testing.assert_array_equal(state["conv1.weight"], kernel.transpose(3, 2, 0, 1))
    changed = {"conv1.weight": state["conv1.weight"] + 1, "fc.weight": state["fc.weight"] * 2}
    m.load_state(changed, strict=False)
    assert tl.changed_tensors(changed, m.state(), list(changed)) == {}
    ft = tl.finetune(m, cut=tl.LayerCut(at="layer2"), head=tl.Head.linear(2))
    assert ft.state()["head.out.weight"].shape == (2, 8)


@needs_torch
@pytest.mark.parametrize("arch, config", [
    ("resnet18", dict(input_size=33, width=4, num_classes=3)),  # odd size: PyTorch's symmetric padding
    ("vit_tiny", dict(image_size=8, patch_size=4, dim=16, depth=2, heads=2, mlp_ratio=2, num_classes=3)),
])
def test_zoo_models_compute_what_the_pytorch_ones_compute(arch, config):
    ours, theirs = (tl.zoo.create(arch, backend=b, seed=2, **config) for b in ("keras", "torch"))
    x = np.random.default_rng(0).uniform(-1, 1, size=(4, *example_shape(ours))).astype(np.float32)
    np.testing.assert_allclose(ours.predict(x), theirs.predict(x), rtol=1e-4, atol=1e-5)


def test_gelu_head_is_exact_gelu():
    from math import erf, sqrt
    ft = tl.finetune(BACKEND.reference_model(0), cut=tl.LayerCut(at="pool"),
                     head=tl.Head.mlp(hidden=(4,), num_classes=2, activation="gelu"))
    z = np.linspace(-3, 3, 13, dtype=np.float32)
    act = ft.native.get_layer("head").get_layer("act0")
    expected = [0.5 * v * (1 + erf(v / sqrt(2))) for v in z]
    np.testing.assert_allclose(act(z[None]).numpy()[0], expected, rtol=1e-5, atol=1e-6)


def test_cached_head_step_is_compiled_once_per_head_structure():
    """Feature caching trains the head with a value-in/value-out step shared by every model with the
    same head, an epoch per call; a model whose base has its own 'pool' layer (the zoo's small_cnn) works too."""
    x = np.random.default_rng(0).normal(size=(26, 8, 8, 3)).astype(np.float32)
    y = np.arange(26) % 3
    # batch 8: three full batches in one graph loop, then a batch of 2
    kw = dict(epochs=2, batch_size=8, optimizer=tl.optim.SGD(lr=0.1, momentum=0.9), progress=False, seed=4)
    runs = []
    for seed in (0, 1, 0):
        base = tl.zoo.create("small_cnn", backend="keras", seed=seed, input_size=8, widths=(4, 8), num_classes=2)
        ft = tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.mlp(hidden=(5,), num_classes=3,
                                                                              dropout=0.3))
        assert "pool" in ft.layers and "head.pool" in ft.layers
        snap = tl.snapshot(ft)
        hist = ft.fit(x, y, **kw)
        assert hist.info["cache_features"] == "used"
        tl.assert_frozen(snap, ft)
        runs.append((hist.info["compilations"], ft.state()))
    assert [c for c, _ in runs][1:] == [0, 0], "later models reuse the compiled head step"
    assert tl.changed_tensors(runs[0][1], runs[2][1]) == {}, "same seeds, same result, whichever step ran"
    uncached = tl.finetune(tl.zoo.create("small_cnn", backend="keras", seed=0, input_size=8, widths=(4, 8),
                                         num_classes=2), cut=tl.LayerCut(drop_last=1),
                           head=tl.Head.mlp(hidden=(5,), num_classes=3, dropout=0.3))
    uncached.fit(x, y, cache_features=False, **kw)
    for name, value in uncached.state().items():
        np.testing.assert_allclose(runs[0][1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def dense_net(activation: str, name: str = "fc", dtype: str = "float32") -> keras.Model:
    inputs = keras.Input((4,))
    hidden = L.Dense(5, name="hidden")(inputs)
    return keras.Model(inputs, L.Dense(3, activation=activation, name=name, dtype=dtype)(hidden))


class Doubling(L.Layer):
    def call(self, x):
        return 2 * x


def test_structure_key_ignores_names_but_not_what_is_computed():
    from tlcore_keras.shared import structure_key

    assert structure_key(dense_net("relu")) == structure_key(dense_net("relu", name="other"))
    assert structure_key(dense_net("relu")) != structure_key(dense_net("gelu"))
    assert structure_key(dense_net("relu")) != structure_key(dense_net("relu", dtype="mixed_bfloat16")), \
        "same float32 weights, computed in bfloat16"
    bigger = keras.Sequential([keras.Input((4,)), L.Dense(5, name="hidden"), L.Dense(4, activation="relu")])
    assert structure_key(bigger) != structure_key(dense_net("relu"))
    custom = keras.Sequential([keras.Input((4,)), Doubling(), L.Dense(3)])
    assert structure_key(custom) is None, "a custom layer's config may not say what it computes"


def test_frozen_features_are_traced_once_per_structure_and_use_each_models_weights():
    x = images(10)

    def finetuned(seed: int, widths=(4, 8)) -> tl.Model:
        base = tl.zoo.create("small_cnn", backend="keras", seed=seed, input_size=8, widths=widths, num_classes=2)
        return tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(3), seed=seed)

    a, b, other = finetuned(0), finetuned(1), finetuned(0, widths=(4, 6))
    fn_a, fn_b, fn_other = (m._feature_function(x)[0] for m in (a, b, other))
    assert fn_a is fn_b, "same structure: one traced function"
    assert fn_other is not fn_a
    for m in (a, b, other):  # each model's own weights go through the shared function
        np.testing.assert_allclose(m._head_model().predict(m._features(x)), m.predict(x), rtol=1e-5, atol=1e-6)
    assert np.abs(a._features(x) - b._features(x)).max() > 1e-3, "negative control: different weights differ"
    custom = keras.Sequential([keras.Input((8, 8, 3)), Doubling(name="double"), L.Conv2D(4, 3, name="conv"),
                               L.GlobalAveragePooling2D(name="gap"), L.Dense(2, name="fc")])
    ft = tl.finetune(tl.wrap(custom), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(3))
    np.testing.assert_allclose(ft._head_model().predict(ft._features(x)), ft.predict(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ sparse gradients
@needs_torch
@pytest.mark.parametrize("spec", [tl.optim.SGD(lr=0.5, momentum=0.9, weight_decay=0.01), tl.optim.Adam(lr=0.05),
                                  tl.optim.AdamW(lr=0.05, weight_decay=0.1), tl.optim.RMSprop(lr=0.05)],
                         ids=lambda s: s.kind)
def test_trainable_embedding_takes_every_optimizer_with_pytorchs_dense_semantics(spec):
    """An Embedding's gradient arrives as tf.IndexedSlices; it must be applied as PyTorch applies
    nn.Embedding(sparse=False)'s dense gradient: rows not looked up still get momentum and decay."""
    inputs = keras.Input((5,))
    # seeded: unseeded initial weights made the float32 comparison with torch flaky (about 1 run in 10
    # landed a weight near 0 whose Adam steps differ by just over atol)
    emb = L.Embedding(20, 4, name="emb", embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05, seed=0))
    fc = L.Dense(3, name="fc", kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    model = keras.Model(inputs, fc(L.GlobalAveragePooling1D(name="pool")(emb(inputs))))
    m = tl.wrap(model)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 10, (4, 5)), rng.integers(10, 20, (4, 5))]).astype(np.float32)
    y = rng.integers(0, 3, 8)
    table, kernel, bias = (v.numpy().copy() for v in (emb.embeddings, model.get_layer("fc").kernel,
                                                      model.get_layer("fc").bias))
    m.fit(x, y, epochs=2, batch_size=4, shuffle=False, optimizer=spec, progress=False)

    t_emb, t_fc = torch.nn.Embedding(20, 4), torch.nn.Linear(4, 3)
    with torch.no_grad():
        t_emb.weight.copy_(torch.from_numpy(table))
        t_fc.weight.copy_(torch.from_numpy(kernel.T))
        t_fc.bias.copy_(torch.from_numpy(bias))
    params = [t_emb.weight, t_fc.weight, t_fc.bias]
    kw = {k: v for k, v in spec.to_dict().items() if k not in ("kind", "alpha", "lr_mult", "no_decay")}
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
           "rmsprop": lambda p, **k: torch.optim.RMSprop(p, alpha=spec.alpha, **k)}[spec.kind](params, **kw)
    for _ in range(2):
        for start in (0, 4):
            ids = torch.from_numpy(x[start:start + 4].astype(np.int64))
            loss = torch.nn.functional.cross_entropy(t_fc(t_emb(ids).mean(1)), torch.from_numpy(y[start:start + 4]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    state = m.state()
    np.testing.assert_allclose(state["emb.embeddings"], t_emb.weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["fc.kernel"], t_fc.weight.detach().numpy().T, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(state["emb.embeddings"][10:], table[10:]), "rows of the second batch trained"
