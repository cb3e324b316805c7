"""LoRA adapters on the Keras backend (backends/tlcore_keras/lora.py): the three primitives
``_lora_targets`` / ``_add_lora`` / ``_remove_lora`` on native and zoo models, checked against numpy
and against Keras' own ``Dense.enable_lora``, then through ``tl.finetune(..., adapter=...)``."""
import numpy as np
import pytest

import tlcore as tl
from tlcore.testing import selected_backends

if "keras" not in selected_backends():
    pytest.skip("keras is not in TLCORE_TEST_BACKENDS", allow_module_level=True)

BACKEND = tl.get_backend("keras")  # before `import keras`: makes Keras run on TensorFlow

import keras  # noqa: E402

from tlcore_keras import lora as klora  # noqa: E402

L = keras.layers
RANK = 2
#: freezes every base tensor, not the adapters (the core's FreezePolicy.all() does that with adapter=)
BASE_ONLY = tl.FreezePolicy.matching(r"\.(kernel|bias|weight)$")


def native_model(seed: int = 0) -> keras.Model:
    """A functional model: ``dense`` (6->8, relu), ``mid`` (8->5), ``out`` (5->3); the same weights for
    the same ``seed`` (seeded initializers: Keras' global seed is left alone)."""
    init = lambda i: keras.initializers.GlorotUniform(seed=100 * seed + i)  # noqa: E731
    inputs = keras.Input((6,))
    x = L.Dense(8, activation="relu", name="dense", kernel_initializer=init(0), bias_initializer=init(1))(inputs)
    x = L.Dense(5, name="mid", kernel_initializer=init(2), bias_initializer=init(3))(x)
    return keras.Model(inputs, L.Dense(3, name="out", kernel_initializer=init(4))(x), name="net")


class Residual(keras.Model):
    """A subclassed model whose call is not a chain of its layers (cut and copied by its attributes)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(6, activation="tanh", name="dense")
        self.out = L.Dense(3, name="out")

    def call(self, x):
        return self.out(x + self.dense(x))


def tiny_vit() -> tl.Model:
    return tl.zoo.create("vit_tiny", backend="keras", dim=16, depth=1, heads=2, image_size=8, patch_size=4,
                         num_classes=3)


def inputs(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def lora_values(target, seed: int, b_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(RANK, target.in_features)).astype(np.float32)
    b = np.zeros((target.out_features, RANK), np.float32) if b_zero else \
        rng.normal(size=(target.out_features, RANK)).astype(np.float32)
    return a, b


def adapt(m: tl.Model, modules, scale: float = 2.0, dropout: float = 0.0, b_zero: bool = False, policy=BASE_ONLY):
    """What the core does: add adapters, reset the tensor list, apply a freeze policy. Returns the values."""
    values = {}
    for i, t in enumerate(t for t in m._lora_targets() if t.module in modules):
        values[t.module] = lora_values(t, seed=10 + i, b_zero=b_zero)
        m._add_lora(t, scale, dropout, *values[t.module])
    m._infos = None
    m._changed()
    m.freeze(policy)
    return values


def numpy_forward(state: dict, x: np.ndarray, scale: float) -> np.ndarray:
    """``native_model`` in numpy from its state (Keras' (in, out) kernels; lora_A (r, in), lora_B (out, r))."""
    def dense(name, h):
        out = h @ state[f"{name}.kernel"] + state[f"{name}.bias"]
        if f"{name}.lora_A" in state:
            out = out + scale * (h @ state[f"{name}.lora_A"].T) @ state[f"{name}.lora_B"].T
        return out
    h = np.maximum(dense("dense", x.astype(np.float64)), 0)
    return dense("out", dense("mid", h))


# ---------------------------------------------------------------------------- targets
def test_targets_native_and_zoo_layouts_and_head_left_out():
    m = tl.wrap(native_model())
    got = [(t.module, t.kernel, t.in_features, t.out_features, t.transposed) for t in m._lora_targets()]
    assert got == [("dense", "dense.kernel", 6, 8, True), ("mid", "mid.kernel", 8, 5, True),
                   ("out", "out.kernel", 5, 3, True)]
    vit = tiny_vit()
    targets = vit._lora_targets()
    assert [t.module for t in targets] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
                                           "blocks.0.mlp.fc2", "fc"]
    state = vit.state()
    for t in targets:  # canonical state shows PyTorch's (out, in): not transposed
        assert not t.transposed and state[t.kernel].shape == (t.out_features, t.in_features)
    ft = tl.finetune(vit, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(4))
    assert "fc" not in [t.module for t in ft._lora_targets()] and ft._head == "head"
    assert len(ft._lora_targets()) == 4


def test_targets_leave_out_what_keras_lora_refuses():
    inputs = keras.Input((4,))
    x = L.Dense(3, kernel_constraint="non_neg", name="constrained")(inputs)
    x = L.EinsumDense("ab,bc->ac", output_shape=3, name="einsum")(x)
    m = tl.wrap(keras.Model(inputs, L.Dense(2, name="plain")(x)))
    assert [t.module for t in m._lora_targets()] == ["plain"]
    with pytest.raises(tl.UnsupportedModelError, match="kernel constraint"):
        klora.add_lora(m.native.get_layer("constrained"), 1.0, 0.0, np.zeros((1, 4), np.float32),
                       np.zeros((3, 1), np.float32))


# ---------------------------------------------------------------------------- state and forward
def test_b_zero_is_bit_identical_and_state_has_torch_layouts():
    m = tl.wrap(native_model())
    x = inputs((7, 6))
    base = m.predict(x)
    values = adapt(m, ("dense", "mid"), b_zero=True)
    assert np.array_equal(m.predict(x), base)  # W + 2 * (A @ 0) is W bit for bit
    state, infos = m.state(), {t.name: t for t in m._tensor_infos()}
    for module, (a, b) in values.items():
        assert np.array_equal(state[f"{module}.lora_A"], a) and np.array_equal(state[f"{module}.lora_B"], b)
        for ab in "AB":
            info = infos[f"{module}.lora_{ab}"]
            assert (info.kind, info.layer) == ("param", module)
    assert not any("lora" in n for n in state if n.startswith("out."))
    # negative control: a B that is not zero moves the outputs
    m._write_state({"dense.lora_B": np.full((8, RANK), 0.5, np.float32)})
    assert not np.allclose(m.predict(x), base, atol=1e-3)


def test_output_matches_numpy_and_write_state_uses_torch_layouts():
    m = tl.wrap(native_model())
    x = inputs((7, 6))
    adapt(m, ("dense", "out"), scale=0.75)
    state = m.state()
    np.testing.assert_allclose(m.predict(x), numpy_forward(state, x, 0.75), rtol=1e-5, atol=1e-5)
    a = inputs((RANK, 6), seed=3)
    m._write_state({"dense.lora_A": a})  # (rank, in), stored by Keras as (in, rank)
    assert np.array_equal(m.native.get_layer("dense").lora_kernel_a.numpy(), a.T)
    np.testing.assert_allclose(m.predict(x), numpy_forward(m.state(), x, 0.75), rtol=1e-5, atol=1e-5)
    # negative control: the reference without the adapters is not what the model computes
    plain = {k: v for k, v in m.state().items() if "lora" not in k}
    assert not np.allclose(m.predict(x), numpy_forward(plain, x, 0.75), atol=1e-3)


def test_zoo_model_equals_its_merged_kernels():
    vit = tiny_vit()
    base = tiny_vit()  # the zoo's same weights
    x = inputs((3, 8, 8, 3))
    assert np.array_equal(vit.predict(x), base.predict(x))
    modules = ("blocks.0.attn.qkv", "blocks.0.mlp.fc2")
    adapt(vit, modules, scale=0.5)
    state = vit.state()
    merged = {f"{m}.weight": state[f"{m}.weight"] + 0.5 * state[f"{m}.lora_B"] @ state[f"{m}.lora_A"]
              for m in modules}
    base._write_state(merged)
    np.testing.assert_allclose(vit.predict(x), base.predict(x), rtol=1e-5, atol=1e-5)
    assert state["blocks.0.attn.qkv.lora_A"].shape == (RANK, 16)
    assert state["blocks.0.attn.qkv.lora_B"].shape == (48, RANK)


def test_same_outputs_as_keras_enable_lora():
    m = tl.wrap(native_model())
    x = inputs((9, 6))
    values = adapt(m, ("dense",), scale=1.5)
    a, b = values["dense"]
    ours = m.native.get_layer("dense")
    theirs = L.Dense(8, activation="relu")
    theirs.build((None, 6))
    theirs.kernel.assign(ours._kernel.numpy())  # (the property merges once LoRA is on)
    theirs.bias.assign(ours.bias.numpy())
    theirs.enable_lora(RANK, lora_alpha=1.5 * RANK)
    theirs.lora_kernel_a.assign(a.T)
    theirs.lora_kernel_b.assign(b.T)
    got, want = ours(x).numpy(), theirs(x).numpy()
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    theirs.lora_kernel_b.assign(2 * b.T)  # negative control: Keras' layer with another B differs
    assert np.abs(ours(x).numpy() - theirs(x).numpy()).max() > 1e-3


# ---------------------------------------------------------------------------- training
def test_fit_trains_adapters_only_and_the_mask_governs_them():
    m = tl.wrap(native_model())
    adapt(m, ("dense", "mid"))
    x, y = inputs((16, 6)), np.arange(16) % 3
    assert {n for n, v in m.trainable_mask().items() if v} == {"dense.lora_A", "dense.lora_B", "mid.lora_A",
                                                                "mid.lora_B"}
    m._verify_native()  # Keras' flags agree (enable_lora's own trainable=False on the kernel included)
    before = m.state()
    m.fit(x, y, epochs=2, batch_size=8, progress=False)
    after = m.state()
    for name in ("dense.kernel", "dense.bias", "mid.kernel", "mid.bias", "out.kernel", "out.bias"):
        assert np.array_equal(after[name], before[name]), name
    for name in ("dense.lora_A", "dense.lora_B", "mid.lora_A", "mid.lora_B"):
        assert not np.array_equal(after[name], before[name]), name
    # negative control: frozen by the policy, the adapters do not move either
    m.freeze(tl.FreezePolicy.all())
    m._verify_native()
    m.fit(x, y, epochs=1, batch_size=8, progress=False)
    again = m.state()
    assert all(np.array_equal(again[n], after[n]) for n in after)


def test_dropout_only_while_training():
    m = tl.wrap(native_model())
    adapt(m, ("dense",), dropout=0.5)
    layer = m.native.get_layer("dense")
    assert type(layer).__name__ == "LoraDense" and "dense.lora_dropout_seed" in m.state()
    assert "dense" in m._stochastic_layers()
    same = tl.wrap(native_model())
    adapt(same, ("dense",), dropout=0.0)  # the same values (same seeds)
    x = inputs((32, 6))
    assert np.array_equal(m.predict(x), same.predict(x))  # inference: Keras' merged path, no dropout
    # the adapter's input is dropped: a layer whose output is the adapter alone shows the mask
    solo = L.Dense(4, use_bias=False, kernel_initializer="zeros", activation="relu")
    solo.build((None, 4))
    klora.add_lora(solo, 1.0, 0.5, np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32))
    ones = np.ones((256, 4), np.float32)
    trained = solo(ones, training=True).numpy()
    assert set(np.unique(trained)) == {0.0, 2.0}  # inverted dropout of rate 0.5 on x, before the relu
    assert 0.3 < (trained == 0).mean() < 0.7
    assert np.array_equal(solo(ones, training=False).numpy(), ones)
    # negative control: rate 0 trains like inference
    other = same.native.get_layer("dense")
    assert np.array_equal(other(x, training=True).numpy(), other(x, training=False).numpy())


def test_dropout_fit_is_seeded():
    x, y = inputs((16, 6)), np.arange(16) % 3
    runs = []
    for _ in range(2):
        m = tl.wrap(native_model())
        adapt(m, ("dense",), dropout=0.3)
        m.fit(x, y, epochs=2, batch_size=8, progress=False, seed=5)
        runs.append(m.state()["dense.lora_B"])
    assert np.array_equal(runs[0], runs[1])
    m = tl.wrap(native_model())
    adapt(m, ("dense",), dropout=0.3)
    m.fit(x, y, epochs=2, batch_size=8, progress=False, seed=6)  # negative control: another seed, other masks
    assert not np.array_equal(m.state()["dense.lora_B"], runs[0])


# ---------------------------------------------------------------------------- removing and copying
def test_remove_restores_the_base():
    m = tl.wrap(native_model())
    x, y = inputs((16, 6)), np.arange(16) % 3
    base = m.predict(x)
    adapt(m, ("dense", "mid"), dropout=0.2)
    m.fit(x, y, epochs=1, batch_size=8, progress=False)
    assert not np.array_equal(m.predict(x), base)  # trained adapters change the outputs (control)
    m._remove_lora("dense")
    m._infos = None
    m._changed()
    m.freeze(BASE_ONLY)
    assert type(m.native.get_layer("dense")) is L.Dense
    assert not any(n.startswith("dense.lora") for n in m.state())
    assert "mid.lora_A" in m.state() and not np.array_equal(m.predict(x), base)
    m._remove_lora("mid")
    m._infos = None
    m._changed()
    m.freeze(BASE_ONLY)
    assert np.array_equal(m.predict(x), base)
    assert not any("lora" in n for n in m.state()) and m._stochastic_layers() == []
    assert not any("lora" in v.name for v in m.native.variables)
    m._verify_native()
    m.freeze(tl.FreezePolicy.none())  # the kernels train again, and the step has no adapter variables
    m.fit(x, y, epochs=1, batch_size=8, progress=False)
    assert not np.array_equal(m.state()["dense.kernel"], native_model().get_layer("dense").kernel.numpy())
    with pytest.raises(tl.UnsupportedModelError, match="no LoRA adapter"):
        m._remove_lora("dense")


def test_dense_subclass_keeps_its_class():
    class Scaled(L.Dense):
        def call(self, inputs, training=None):
            return 3.0 * super().call(inputs, training=training)

    inputs_ = keras.Input((4,))
    m = tl.wrap(keras.Model(inputs_, Scaled(2, name="s")(inputs_)))
    x = inputs((5, 4))
    base = m.predict(x)
    (t,) = m._lora_targets()
    a, b = lora_values(t, 0)
    m._add_lora(t, 1.0, 0.0, a, b)
    layer = m.native.get_layer("s")
    assert isinstance(layer, Scaled) and isinstance(layer, klora.LoraDense)
    want = 3.0 * (x @ layer._kernel.numpy() + layer.bias.numpy() + (x @ a.T) @ b.T)
    np.testing.assert_allclose(m.predict(x), want, rtol=1e-5, atol=1e-5)
    m._remove_lora("s")
    assert type(layer) is Scaled and np.array_equal(m.predict(x), base)


@pytest.mark.parametrize("which", ["native", "subclassed", "zoo"])
def test_cut_copy_keeps_adapters_and_scale(which):
    m = {"native": lambda: tl.wrap(native_model()), "subclassed": lambda: tl.wrap(Residual(), input_shape=(6,)),
         "zoo": tiny_vit}[which]()
    x = inputs((4, 8, 8, 3) if which == "zoo" else (4, 6))
    modules = [t.module for t in m._lora_targets()][:2]
    adapt(m, modules, scale=0.25)  # alpha 0.5 with rank 2: Keras' own build would reset it to 2
    copy = m._cut(None, m.layers)
    assert copy.native is not m.native
    src, dst = m.state(), copy.state()
    assert set(dst) == set(src) and all(np.array_equal(src[n], dst[n]) for n in src)
    assert np.array_equal(copy.predict(x), m.predict(x))
    assert [t.module for t in copy._lora_targets()] == [t.module for t in m._lora_targets()]
    # independent: moving the copy's adapter leaves the original alone
    name = f"{modules[0]}.lora_B"
    copy._write_state({name: dst[name] + 1.0})
    assert np.array_equal(m.state()[name], src[name]) and not np.array_equal(copy.predict(x), m.predict(x))


def test_keras_own_lora_loses_its_alpha_when_copied():
    """Why LoraDense exists: Keras' Dense re-created from its config re-enables LoRA with alpha = rank."""
    layer = L.Dense(3)
    layer.build((None, 4))
    layer.enable_lora(RANK, lora_alpha=0.5)
    clone = L.Dense.from_config(layer.get_config())
    clone.build((None, 4))
    assert clone.lora_alpha == RANK != layer.lora_alpha  # Keras 3.15; if this fails Keras fixed it
    ours = klora.LoraDense.from_config({**layer.get_config(), "lora_dropout": 0.1})
    ours.build((None, 4))
    assert ours.lora_alpha == 0.5 and ours.lora_scale == 0.25 and klora.SEED_ATTR in vars(ours)


# ---------------------------------------------------------------------------- the public API
def test_finetune_with_adapter_freezes_the_base():
    if not hasattr(tl, "Adapter"):
        pytest.skip("the core's tl.Adapter is not there yet")
    base = tiny_vit()
    x, y = inputs((16, 8, 8, 3)), np.arange(16) % 4
    ft = tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(4),
                     adapter=tl.Adapter.lora(rank=RANK, alpha=4, targets=r"attn\.(qkv|proj)"))
    assert sorted(n for n in ft.state() if "lora" in n) == [
        f"blocks.0.attn.{m}.lora_{ab}" for m in ("proj", "qkv") for ab in "AB"]
    assert {n for n, v in ft.trainable_mask().items() if v} == {
        *(f"blocks.0.attn.{m}.lora_{ab}" for m in ("proj", "qkv") for ab in "AB"), "head.out.weight", "head.out.bias"}
    before = ft.state()
    snap = tl.snapshot(ft)
    ft.fit(x, y, epochs=2, batch_size=8, progress=False)
    tl.assert_frozen(snap, ft)
    ft._verify_native()
    after = ft.state()
    assert not np.array_equal(after["blocks.0.attn.qkv.lora_B"], before["blocks.0.attn.qkv.lora_B"])
    assert np.array_equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    assert "lora" not in " ".join(base.state())  # finetune adapted its copy, not the base
