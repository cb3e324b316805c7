"""What only the JAX backend has: compiled steps (counted, reused, one per batch shape), gradients
taken only for trainable parameters (checked in the step's jaxpr and in the HLO XLA runs), NNX
names and cut rules, and optimizer numerics against PyTorch's definitions."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import tlcore as tl
from tlcore.losses import CrossEntropy
from tlcore.optim import TrainSpec
from tlcore.testing import reference_finetune, sample_data

pytest.importorskip("flax", reason="the JAX backend (jax, flax, optax) is not installed")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from tlcore_jax import train  # noqa: E402
from tlcore_jax.layers import NamedSequential, Pool  # noqa: E402
from jaxpr_walk import conv_count  # noqa: E402




def hlo_conv_count(text: str) -> int:
    return len(re.findall(r"\bconvolution\(", text))


def trainer_for(model: tl.Model, optimizer=None, clip=None, seed=0):
    """A trainer started as the core starts a run."""
    trainer = model._make_trainer(TrainSpec(optimizer or tl.optim.Adam(lr=1e-2), CrossEntropy(), clip, seed))
    trainer.reset(seed)
    return trainer


def fit(model, x, y, **kw):
    kw.setdefault("optimizer", tl.optim.Adam(lr=1e-2))
    return model.fit(x, y, epochs=kw.pop("epochs", 1), batch_size=kw.pop("batch_size", 16), progress=False,
                     cache_features=False, **kw)


# ---------------------------------------------------------------- compilation


def test_step_compiles_once_and_is_reused_across_epochs_and_fits():
    train.clear_cache()
    ft = reference_finetune("jax", tl.FreezePolicy.up_to("bn1"))
    x, y = sample_data(ft, n=48)
    first = fit(ft, x, y, epochs=3)
    assert first.info["compilations"] == 1, "9 steps of one batch shape: one compilation"
    assert fit(ft, x, y, epochs=2).info["compilations"] == 0, "nothing changed: the compiled step is reused"
    other = reference_finetune("jax", tl.FreezePolicy.up_to("bn1"), seed=5)
    assert fit(other, x, y).info["compilations"] == 0, "same structure and policy: shared across models"
    # negative controls: what does change the step compiles it again, once
    ft.freeze(tl.FreezePolicy.all())
    assert fit(ft, x, y, epochs=2).info["compilations"] == 1
    assert fit(ft, x, y, optimizer=tl.optim.SGD(lr=0.1)).info["compilations"] == 1
    assert fit(ft, x, y, optimizer=tl.optim.SGD(lr=0.1), clip_grad_norm=1.0).info["compilations"] == 1


def test_partial_last_batch_compiles_once_not_once_per_epoch():
    train.clear_cache()
    ft = reference_finetune("jax")
    x, y = sample_data(ft, n=40)  # batches of 16, 16 and 8
    hist = fit(ft, x, y, epochs=4, optimizer=tl.optim.RMSprop(lr=1e-3))
    assert hist.info["steps"] == 12
    assert hist.info["compilations"] == 2, "one compilation per batch shape (16 and 8), not per epoch"
    assert fit(ft, x, y, epochs=2, optimizer=tl.optim.RMSprop(lr=1e-3)).info["compilations"] == 0


def test_step_outputs_keep_their_types_so_steps_never_retrace():
    ft = reference_finetune("jax", tl.FreezePolicy.none())
    x, y = sample_data(ft, n=16)
    trainer = trainer_for(ft, tl.optim.SGD(lr=0.1, momentum=0.9, nesterov=True))
    before = jax.tree_util.tree_map(jax.typeof, (trainer.trainable, trainer.mutable, trainer.opt_state))
    for _ in range(3):
        trainer.step(x, y)
    after = jax.tree_util.tree_map(jax.typeof, (trainer.trainable, trainer.mutable, trainer.opt_state))
    assert before == after  # shapes, dtypes and weak types (a weak type flip would retrace)
    assert trainer.compilations <= 1


# ---------------------------------------------------------------- frozen costs nothing

FORWARD_CONVS = 2  # the reference network cut after relu2 has two convolutions


@pytest.mark.parametrize("clip", [None, 0.5])
def test_no_gradient_is_computed_for_frozen_parameters(clip):
    ft = reference_finetune("jax")
    x, y = sample_data(ft, n=16)
    trainer = trainer_for(ft, tl.optim.AdamW(lr=1e-2, weight_decay=0.05), clip)
    # only the trainable parameters are differentiated and optimized
    trainable = {".".join(map(str, p)) for p in trainer.trainable_paths}
    assert trainable == {"head.fc0.weight", "head.fc0.bias", "head.out.weight", "head.out.bias"}
    # no backward convolution at all, before XLA's dead-code elimination and after it
    assert conv_count(trainer.jaxpr(x, y).jaxpr) == FORWARD_CONVS
    assert hlo_conv_count(trainer.compiled_text(x, y)) == FORWARD_CONVS


def test_gradient_reaches_only_as_far_back_as_the_first_trainable_layer():
    x, y = sample_data(reference_finetune("jax"), n=16)
    counts = {}
    for name, policy in {"up_to_bn1": tl.FreezePolicy.up_to("bn1"), "bn_train": tl.FreezePolicy.all(bn="train"),
                         "none": tl.FreezePolicy.none()}.items():
        trainer = trainer_for(reference_finetune("jax", policy), clip=1.0)
        counts[name] = conv_count(trainer.jaxpr(x, y).jaxpr)
    # conv2 trainable: + its kernel gradient; BatchNorm trainable in front of conv2: + the gradient
    # through conv2's input; everything trainable: + conv2 input, conv2 kernel, conv1 kernel
    assert counts == {"up_to_bn1": 3, "bn_train": 3, "none": 5}


def test_naive_zeroed_gradients_with_clipping_would_be_caught():
    """Negative control for the test above: the common recipe (gradient of every parameter, then
    ``multi_transform`` with ``set_to_zero`` for frozen ones) computes backward convolutions that
    clipping keeps alive; the same checks see them."""
    model = tl.get_backend("jax").reference_model().native
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    labels = jax.tree_util.tree_map_with_path(lambda p, _: "train" if p[0].key == "fc" else "freeze", params)
    tx = optax.chain(optax.clip_by_global_norm(0.5),
                     optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels))
    opt_state = tx.init(params)
    x = jnp.zeros((16, 8, 8, 3))
    y = jnp.zeros((16,), jnp.int32)

    def naive_step(params, opt_state, rest):
        def loss(p):
            m = nnx.merge(graphdef, p, rest)
            m.eval()  # even with every BatchNorm frozen
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    jaxpr = jax.make_jaxpr(naive_step)(params, opt_state, rest)
    hlo = jax.jit(naive_step).lower(params, opt_state, rest).compile().as_text()
    assert conv_count(jaxpr.jaxpr) > FORWARD_CONVS
    assert hlo_conv_count(hlo) > FORWARD_CONVS


def test_optimizer_state_only_for_trainable_parameters():
    ft = reference_finetune("jax")
    head = [n for n in ft.state() if ft.trainable_mask()[n] and "rngs" not in n]
    head_bytes = sum(ft.state()[n].nbytes for n in head)
    scalars = 8 * len(head)  # per parameter: its step count (int32) and its last learning rate (float32)
    assert trainer_for(ft, tl.optim.Adam(lr=1e-3)).optimizer_state_bytes() == 2 * head_bytes + scalars
    assert trainer_for(ft, tl.optim.SGD(lr=0.1)).optimizer_state_bytes() == scalars
    sgd = tl.optim.SGD(lr=0.1, momentum=0.9, weight_decay=1e-2)
    assert trainer_for(ft, sgd).optimizer_state_bytes() == head_bytes + scalars
    unstarted = ft._make_trainer(TrainSpec(sgd))
    assert unstarted.optimizer_state_bytes() == head_bytes + scalars, "what it will hold, without starting it"
    assert not unstarted.started


class Tied(nnx.Module):
    """One Linear layer used twice (tied weights), then a classifier."""

    def __init__(self, rngs: nnx.Rngs):
        self.enc = nnx.Linear(4, 4, rngs=rngs)
        self.dec = self.enc
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.dec(nnx.relu(self.enc(x)))))


def test_tied_weights_stay_tied_and_their_gradient_sums_both_uses():
    m = tl.wrap(Tied(nnx.Rngs(0)), input_shape=(4,))
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    y = np.arange(8) % 3
    # the reference: plain JAX, the gradient of the shared parameters taken once, through both uses
    # (nnx.split lists the shared layer once, under its first name in sorted order: "dec")
    graphdef, params = nnx.split(m.native, nnx.Param)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()

    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params))
    before = np.asarray(m.native.enc.kernel.get_value())
    fit(m, x, y, optimizer=tl.optim.SGD(lr=0.1), batch_size=8)
    assert m.native.dec is m.native.enc, "still one layer"
    after = np.asarray(m.native.enc.kernel.get_value())
    assert not np.allclose(after, before), "negative control: the shared kernel trained"
    np.testing.assert_allclose(after, expected["dec"]["kernel"].get_value(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(m.native.out.kernel.get_value()),
                               expected["out"]["kernel"].get_value(), atol=1e-6)


class PairVariable(nnx.Module):
    """Holds a tuple of two arrays in one Variable, which the training step cannot take apart."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(4, 3, rngs=rngs)
        self.extra = nnx.Variable((jnp.zeros(2), jnp.ones(2)))

    def __call__(self, x):
        return self.fc(x)


def test_a_variable_holding_several_arrays_is_named_before_training_starts():
    m = tl.wrap(PairVariable(nnx.Rngs(0)), input_shape=(4,))
    before = np.asarray(m.native.fc.kernel.get_value())
    with pytest.raises(tl.TlcoreError, match=r"\['extra'\].*one array per nnx.Variable"):
        fit(m, np.zeros((8, 4), np.float32), np.zeros(8, int))
    np.testing.assert_array_equal(np.asarray(m.native.fc.kernel.get_value()), before)


# ---------------------------------------------------------------- BatchNorm and randomness


class ExplicitBN(nnx.Module):
    """Passes use_running_average to its BatchNorm itself, overriding the frozen mode."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.fc = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.bn(self.conv(x), use_running_average=False).mean(axis=(1, 2)))


def test_frozen_batchnorm_overridden_by_the_model_is_an_error_not_a_silent_update():
    m = tl.wrap(ExplicitBN(nnx.Rngs(0)), input_shape=(6, 6, 3))
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype(np.float32)
    y = np.arange(8) % 2
    ft = tl.finetune(m, freeze=tl.FreezePolicy.matching(r"^(conv|bn)\."))
    snap = tl.snapshot(ft)
    with pytest.raises(train.FrozenBatchNormUpdated, match="use_running_average"):
        fit(ft, x, y, batch_size=8)
    assert tl.changed_tensors(snap, ft.state(), [n for n in snap if not n.endswith(("key", "count"))]) == {}
    # negative control: with BatchNorm trainable the same model trains
    ft.freeze(tl.FreezePolicy.matching(r"^conv\.", bn="train"))
    fit(ft, x, y, batch_size=8)
    assert "bn.mean" in tl.changed_tensors(snap, ft.state())


def test_dropout_keys_come_from_the_fit_seed():
    def run(seed):
        ft = reference_finetune("jax", dropout=0.5)
        x, y = sample_data(ft)
        fit(ft, x, y, seed=seed)
        return ft.state()

    a, b, c = run(3), run(3), run(4)
    assert tl.changed_tensors(a, b) == {}
    assert "head.out.weight" in tl.changed_tensors(a, c), "another seed draws other dropout masks"
    assert a["head.drop0.rngs.count"] == 3  # one key per step


def test_feature_cache_trains_the_head_with_the_same_dropout_keys():
    results = {}
    for cache in (False, True):
        ft = reference_finetune("jax", dropout=0.5)
        x, y = sample_data(ft, n=40)
        hist = ft.fit(x, y, epochs=2, batch_size=16, seed=2, progress=False, cache_features=cache)
        results[cache] = (ft.state(), hist.info["cache_features"])
    assert results[True][1] == "used" and results[False][1] == "off"
    for name, value in results[False][0].items():
        np.testing.assert_allclose(results[True][0][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------- names, cuts, heads


def test_reference_state_names_kinds_and_mask():
    m = tl.get_backend("jax").reference_model()
    kinds = {t.name: t.kind for t in m.tensors}
    assert kinds["conv1.kernel"] == "param" and kinds["bn1.scale"] == "bn_param"
    assert kinds["bn1.mean"] == kinds["bn2.var"] == "bn_stat"
    assert kinds["dropout.rngs.key"] == kinds["dropout.rngs.count"] == "rng"
    assert m.state()["conv1.kernel"].shape == (3, 3, 3, 8)  # HWIO, NHWC inputs
    ft = tl.finetune(m, cut=tl.LayerCut(at="dropout"), freeze=tl.FreezePolicy.all())
    mask = ft.trainable_mask()
    assert mask["dropout.rngs.count"] and not mask["bn1.mean"] and not mask["conv2.kernel"]


def test_nnx_sequential_children_are_cut_points_and_dotted_names_reach_nested_ones():
    rngs = nnx.Rngs(0)
    net = nnx.Sequential(nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.relu), nnx.Linear(8, 8, rngs=rngs),
                         nnx.relu, nnx.Linear(8, 3, rngs=rngs))
    m = tl.wrap(net)
    assert m.layers == ["0", "0.0", "0.1", "1", "2", "3"]
    assert set(m.state()) == {"0.0.kernel", "0.0.bias", "1.kernel", "1.bias", "3.kernel", "3.bias"}
    assert m.input_shape == (4,)
    ft = tl.finetune(m, cut=tl.LayerCut(at="0.0"), head=tl.Head.linear(2))
    assert ft.layers == ["0", "0.0", "head", "head.pool", "head.out"]
    assert ft.predict(np.ones((5, 4), np.float32)).shape == (5, 2)
    assert ft.native.head.out.weight.shape == (2, 8)  # PyTorch's (out, in), as every backend's head
    np.testing.assert_array_equal(ft.state()["0.0.kernel"], m.state()["0.0.kernel"])
    assert ft.native is not net and getattr(ft.native, "0").layers[0].kernel is not net.layers[0].layers[0].kernel


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_batchnorm_inside_nnx_sequential_is_frozen_by_its_tlcore_name(bn):
    rngs = nnx.Rngs(0)
    net = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs), nnx.relu,
                         nnx.Dropout(0.2, rngs=rngs), Pool(), nnx.Linear(4, 2, rngs=rngs))
    ft = tl.finetune(tl.wrap(net, input_shape=(6, 6, 3)), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(2),
                     freeze=tl.FreezePolicy.all(bn=bn))
    assert {t.unit for t in ft.tensors if t.kind == "bn_stat"} == {"1"}
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype(np.float32)
    snap = tl.snapshot(ft)
    fit(ft, x, np.arange(8) % 2, batch_size=8)
    checked = tl.assert_frozen(snap, ft)
    changed = tl.changed_tensors(snap, ft.state())
    if bn == "frozen":
        assert {"1.mean", "1.var", "1.scale", "0.kernel"} <= set(checked)
    else:  # negative control: the same statistics do move when BatchNorm trains
        assert "0.kernel" in checked and {"1.mean", "1.var", "1.scale"} <= set(changed)
    assert {"head.out.weight", "3.rngs.count"} <= set(changed)


def test_named_sequential_nested_cut_keeps_names_and_copies_weights():
    rngs = nnx.Rngs(0)
    net = NamedSequential(
        block1=NamedSequential(conv=nnx.Conv(3, 4, (3, 3), rngs=rngs), bn=nnx.BatchNorm(4, rngs=rngs), relu=nnx.relu),
        block2=NamedSequential(conv=nnx.Conv(4, 4, (3, 3), rngs=rngs), relu=nnx.relu),
        pool=Pool(), fc=nnx.Linear(4, 2, rngs=rngs))
    m = tl.wrap(net)
    assert m.input_shape == (None, None, 3)
    assert m.layers[:5] == ["block1", "block1.conv", "block1.bn", "block1.relu", "block2"]
    ft = tl.finetune(m, cut=tl.LayerCut(at="block2.conv"), head=tl.Head.linear(3), input_shape=(6, 6, 3))
    assert [n for n in ft.layers if not n.startswith("head")] == ["block1", "block1.conv", "block1.bn",
                                                                  "block1.relu", "block2", "block2.conv"]
    assert {t.unit for t in ft.tensors if t.kind == "bn_stat"} == {"block1.bn"}
    snap = tl.snapshot(m)
    x = np.random.default_rng(0).normal(size=(8, 6, 6, 3)).astype(np.float32)
    ft.freeze(tl.FreezePolicy.none())
    fit(ft, x, np.arange(8) % 3, batch_size=8)
    assert tl.changed_tensors(snap, m.state()) == {}, "the original model is never modified"
    assert "block2.conv.kernel" in tl.changed_tensors(snap, ft.state(), ["block2.conv.kernel"])


class TwoPath(nnx.Module):
    """Not sequential: its __call__ combines its submodules freely."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.side = nnx.Conv(3, 4, (1, 1), rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)])
        self.token = nnx.Param(jnp.zeros((4,)))

    def __call__(self, x):
        h = self.stem(x) + self.side(x) + self.token[...]
        for block in self.blocks:
            h = nnx.relu(block(h))
        return h


def test_module_that_is_not_sequential_is_cut_by_running_its_own_call():
    m = tl.wrap(TwoPath(nnx.Rngs(0)), input_shape=(5, 5, 3))
    assert m.layers == ["stem", "side", "blocks", "blocks.0", "blocks.1"]
    assert {t.name: t.layer for t in m.tensors}["token"] == ""  # root tensors belong to no layer
    x = np.random.default_rng(0).normal(size=(6, 5, 5, 3)).astype(np.float32)
    cut = tl.finetune(m, cut=tl.LayerCut(at="blocks.0"), head=tl.Head.linear(2))
    # the layer the cut removed is no cut point any more
    assert cut.layers == ["stem", "side", "blocks", "blocks.0", "head", "head.pool", "head.out"]
    assert "blocks.1.kernel" not in cut.state()
    net = m.native
    expected = np.asarray(net.blocks[0](net.stem(x) + net.side(x) + net.token[...]))  # before the loop's relu
    np.testing.assert_allclose(tl.finetune(m, cut=tl.LayerCut(at="blocks.0")).predict(x), expected,
                               rtol=1e-5, atol=1e-6)
    # features() is the head's input after its pool (global average of the images)
    np.testing.assert_allclose(cut.features(x), expected.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    # kept whole, it takes a head after its output, and keeps its own names
    ft = tl.finetune(m, head=tl.Head.linear(2), freeze=tl.FreezePolicy.up_to("side"))
    assert ft.layers[-3:] == ["head", "head.pool", "head.out"]
    assert {"stem.kernel", "blocks.0.kernel", "token", "head.out.weight"} <= set(ft.state())
    assert [n for n, t in ft.trainable_mask().items() if not t] == ["token", "stem.bias", "stem.kernel",
                                                                    "side.bias", "side.kernel"]
    snap = tl.snapshot(ft)
    fit(ft, x, np.arange(6) % 2, batch_size=6)
    tl.assert_frozen(snap, ft)
    assert "blocks.1.kernel" in tl.changed_tensors(snap, ft.state())


def test_head_pools_tokens_and_flattens_images():
    rngs = nnx.Rngs(0)
    tokens = tl.wrap(nnx.Sequential(nnx.Linear(5, 6, rngs=rngs)))
    ft = tl.finetune(tokens, head=tl.Head.linear(2), input_shape=(4, 5))
    x = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    s = ft.state()
    feats = x @ s["0.kernel"] + s["0.bias"]
    expected = feats.mean(axis=1) @ s["head.out.weight"].T + s["head.out.bias"]
    np.testing.assert_allclose(ft.predict(x), expected, rtol=1e-5, atol=1e-5)
    images = tl.get_backend("jax").reference_model()
    flat = tl.finetune(images, cut=tl.LayerCut(at="relu2"), head=tl.Head.linear(3, pool="flatten"))
    assert flat.state()["head.out.weight"].shape == (3, 8 * 8 * 16)
    assert flat.summary().rows[-1][2] == "(3,)"


def test_head_waits_for_its_first_batch_when_the_input_shape_is_unknown():
    rngs = nnx.Rngs(0)
    m = tl.wrap(NamedSequential(conv=nnx.Conv(3, 4, (3, 3), rngs=rngs)))
    assert m.input_shape == (None, None, 3)
    ft = tl.finetune(m, head=tl.Head.linear(2))
    assert not ft.head_built
    with pytest.raises(tl.HeadNotBuiltError, match="first batch"):
        ft.state()
    assert ft.predict(np.zeros((1, 6, 6, 3), np.float32)).shape == (1, 2)
    assert ft.head_built and ft.state()["head.out.weight"].shape == (2, 4)
    eager = tl.finetune(m, head=tl.Head.linear(2), input_shape=(6, 6, 3))
    assert eager.head_built
    assert tl.changed_tensors(eager.state(), ft.state()) == {}, "the same weights, whenever built"


def test_named_sequential_refuses_bad_names():
    with pytest.raises(ValueError, match="invalid NamedSequential layer name 'a.b'"):
        NamedSequential([("a.b", nnx.relu)])
    with pytest.raises(ValueError, match="invalid"):
        NamedSequential(names=nnx.relu)
    with pytest.raises(ValueError, match="duplicate"):
        NamedSequential([("a", nnx.relu), ("a", nnx.relu)])


# ---------------------------------------------------------------- zoo models (PyTorch names and layouts)


def test_zoo_resnet_freezes_batchnorm_inside_its_blocks_by_name():
    m = tl.zoo.create("resnet18", backend="jax", input_size=32, width=4, num_classes=3)
    assert m.state()["layer2.0.downsample.0.weight"].shape == (8, 4, 1, 1)  # (out, in, kh, kw)
    ft = tl.finetune(m, cut=tl.LayerCut(at="layer2"), head=tl.Head.linear(2), freeze=tl.FreezePolicy.up_to("layer1"))
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    assert ft.build(x[:1]).state()["head.out.weight"].shape == (2, 8)
    snap = tl.snapshot(ft)
    fit(ft, x, np.arange(4) % 2, batch_size=4)
    checked = tl.assert_frozen(snap, ft)
    assert {"layer1.1.bn2.running_mean", "layer1.0.conv1.weight", "bn1.running_var"} <= set(checked)
    changed = tl.changed_tensors(snap, ft.state())
    assert {"layer2.0.bn1.running_mean", "layer2.0.downsample.1.running_var", "layer2.1.conv2.weight"} <= set(changed)


def test_canonical_batchnorm_follows_pytorch_including_the_unbiased_running_variance():
    torch = pytest.importorskip("torch", reason="the numerics reference needs torch")
    from tlcore_jax.freeze import set_modes
    from tlcore_jax.layers import CanonicalBatchNorm

    x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 3, 3, 5)).astype(np.float32)
    ref = torch.nn.BatchNorm2d(5)
    expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    bn = CanonicalBatchNorm(5)
    np.testing.assert_allclose(np.asarray(bn(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(np.asarray(getattr(bn, name)[...]), getattr(ref, name).numpy(), rtol=1e-5)
    set_modes(bn, training=True, frozen_bn=frozenset({()}))  # frozen: inference mode, statistics kept
    before = np.asarray(bn.running_mean[...])
    ref.eval()
    expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(np.asarray(bn(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(bn.running_mean[...]), before)
    assert nnx.view(bn, use_running_average=False).use_running_average is False


# ---------------------------------------------------------------- optimizer numerics


def torch_reference(spec, w, b, x, y, steps, clip):
    """The same full-batch steps with torch.optim: the definitions tlcore.optim follows."""
    torch = pytest.importorskip("torch", reason="the numerics reference needs torch")
    lin = torch.nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w.T.copy()))
        lin.bias.copy_(torch.from_numpy(b))
    params = list(lin.parameters())
    kw = dict(lr=spec.lr, weight_decay=spec.weight_decay)
    opt = {"sgd": lambda: torch.optim.SGD(params, momentum=spec.momentum, nesterov=spec.nesterov, **kw),
           "adam": lambda: torch.optim.Adam(params, betas=spec.betas, eps=spec.eps, **kw),
           "adamw": lambda: torch.optim.AdamW(params, betas=spec.betas, eps=spec.eps, **kw),
           "rmsprop": lambda: torch.optim.RMSprop(params, alpha=spec.alpha, eps=spec.eps, momentum=spec.momentum,
                                                  centered=spec.centered, **kw)}[spec.kind]()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    return lin.weight.detach().numpy().T, lin.bias.detach().numpy()


@pytest.mark.parametrize("spec", [
    tl.optim.SGD(lr=0.3, momentum=0.9, nesterov=True, weight_decay=0.05),
    tl.optim.Adam(lr=0.05, weight_decay=0.1),
    tl.optim.AdamW(lr=0.05, betas=(0.8, 0.99), weight_decay=0.2),
    tl.optim.RMSprop(lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.05),
    tl.optim.RMSprop(lr=0.01, eps=1e-3),
], ids=["sgd_nesterov_wd", "adam_l2", "adamw", "rmsprop_centered_momentum_wd", "rmsprop_eps"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_optimizers_follow_pytorch_definitions(spec, clip):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=24)
    lin = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    m = tl.wrap(lin)
    w0, b0 = m.state()["kernel"], m.state()["bias"]
    m.fit(x, y, epochs=4, batch_size=24, optimizer=spec, shuffle=False, clip_grad_norm=clip, progress=False)
    w, b = torch_reference(spec, w0, b0, x, y.astype(np.int64), 4, clip)
    assert not np.allclose(m.state()["kernel"], w0), "the step must move the weights"
    np.testing.assert_allclose(m.state()["kernel"], w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(m.state()["bias"], b, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------- import isolation


def _imported(code: str) -> set[str]:
    frameworks = ("torch", "tensorflow", "keras", "jax", "flax", "optax")
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(m for m in "
                          f"{frameworks!r} if m in sys.modules))"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_registry_and_package_import_no_jax_and_the_backend_only_its_own_frameworks():
    assert _imported("import tlcore as tl, tlcore_jax\ntl.available_backends(); tl.registry.specs()") == set()
    code = ("import tlcore as tl\nm = tl.get_backend('jax').reference_model()\n"
            "ft = tl.finetune(m, cut=tl.LayerCut(at='relu2'), head=tl.Head.linear(2))\n"
            "ft.fit(__import__('numpy').zeros((4, 8, 8, 3)), [0, 1, 0, 1], progress=False)")
    assert _imported(code) == {"jax", "flax", "optax"}
