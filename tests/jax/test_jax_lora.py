"""LoRA on the JAX backend, through its three primitives (``_lora_targets``, ``_add_lora``,
``_remove_lora``) and then the public API: targets and their forward order, the adapted output
against numpy and against Flax's own ``nnx.LoRALinear``/``nnx.LoRA``, training that moves only the
adapters, removal, copies made by ``_cut``, the dropout's train/inference modes, and compiled steps
shared across equal structures."""
from __future__ import annotations

import numpy as np
import pytest

import tlcore as tl

pytest.importorskip("flax", reason="the JAX backend (jax, flax, optax) is not installed")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tlcore_jax import lora  # noqa: E402
from tlcore_jax.freeze import set_modes  # noqa: E402

VIT = {"dim": 16, "depth": 2, "heads": 2, "mlp_ratio": 2, "image_size": 8, "patch_size": 4, "num_classes": 3}
BLOCK = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
#: what the core's adapters do to the freeze policy, at the primitive level: every tensor but the adapters frozen
ONLY_ADAPTERS = tl.FreezePolicy.matching(r"^(?!.*\.lora_[AB]$)")
RANK, SCALE = 2, 2.0


def vit(seed: int = 0) -> tl.Model:
    return tl.zoo.create("vit_tiny", backend="jax", seed=seed, **VIT)


def mlp(seed: int = 0) -> tl.Model:
    rngs = nnx.Rngs(seed)
    return tl.wrap(nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 3, rngs=rngs)))


def images(n: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype(np.float32)


def vectors(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n)


def values(t, seed: int = 1, zero_b: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.5, 0.5, (RANK, t.in_features)).astype(np.float32)
    b = np.zeros((t.out_features, RANK), np.float32) if zero_b else \
        rng.normal(0, 0.3, (t.out_features, RANK)).astype(np.float32)
    return a, b


def adapt(m: tl.Model, targets=None, dropout: float = 0.0, zero_b: bool = True, scale: float = SCALE,
          policy: tl.FreezePolicy = ONLY_ADAPTERS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Add adapters as the core does (then its tensor list reset and the policy applied)."""
    given = {}
    for i, t in enumerate(m._lora_targets() if targets is None else targets):
        given[t.module] = values(t, seed=i + 1, zero_b=zero_b)
        m._add_lora(t, scale, dropout, *given[t.module])
    m._infos = None
    m._changed()
    m.freeze(policy)
    return given


def fit(m: tl.Model, x, y, **kw):
    kw = {"epochs": 2, "batch_size": 4, "progress": False, "cache_features": False,
          "optimizer": tl.optim.Adam(lr=1e-2), **kw}
    return m.fit(x, y, **kw)


# ---------------------------------------------------------------- targets
def test_targets_of_a_zoo_vit_in_forward_order_also_after_a_copy_sorted_its_attributes():
    m = vit()
    names = [f"blocks.{i}.{b}" for i in range(2) for b in BLOCK] + ["fc"]
    ts = m._lora_targets()
    assert [t.module for t in ts] == names
    assert all(t.kernel == f"{t.module}.weight" and not t.transposed for t in ts)
    state = m.state()
    assert all(state[t.kernel].shape == (t.out_features, t.in_features) for t in ts)
    assert (ts[0].in_features, ts[0].out_features) == (16, 48)
    copy = m._cut(None, m.layers)
    # nnx.clone sorts a module's attributes (proj before qkv): the order comes from a call, not from them
    assert list(vars(copy.native.blocks.layers[0].attn)).index("proj") < \
        list(vars(copy.native.blocks.layers[0].attn)).index("qkv")
    assert [t.module for t in copy._lora_targets()] == names
    # the attached head's dense layers are not targets (negative control above: "fc" is one without a head)
    ft = tl.finetune(vit(), cut=tl.LayerCut(drop_last=1), head=tl.Head.mlp((6,), num_classes=5))
    assert [t.module for t in ft._lora_targets()] == names[:-1]
    assert any(n.startswith("head.") and n.endswith(".weight") for n in ft.state())


def test_targets_of_a_native_sequential_are_flax_kernels_in_their_in_out_layout():
    m = mlp()
    ts = m._lora_targets()
    assert [(t.module, t.kernel, t.in_features, t.out_features, t.transposed) for t in ts] == \
        [("0", "0.kernel", 4, 8, True), ("2", "2.kernel", 8, 3, True)]
    assert m.state()["0.kernel"].shape == (4, 8)


# ---------------------------------------------------------------- adding, outputs
def test_adapters_start_at_the_base_outputs_with_peft_layouts_owned_by_the_kernels_layer():
    m = vit()
    x = images()
    base_out, base_state = m.predict(x), m.state()
    given = adapt(m)
    assert np.array_equal(m.predict(x), base_out), "B = 0: bit-identical outputs"
    state = m.state()
    assert {k: v for k, v in state.items() if ".lora_" not in k}.keys() == base_state.keys()
    assert tl.changed_tensors(base_state, state) == {}
    infos = {t.name: t for t in m.tensors}
    for module, (a, b) in given.items():
        assert np.array_equal(state[f"{module}.lora_A"], a) and np.array_equal(state[f"{module}.lora_B"], b)
        owner = infos[f"{module}.weight"].layer
        assert infos[f"{module}.lora_A"].layer == infos[f"{module}.lora_B"].layer == owner
        assert infos[f"{module}.lora_A"].kind == infos[f"{module}.lora_B"].kind == "param"
    assert {n for n, t in m.trainable_mask().items() if t} == {n for n in state if ".lora_" in n}
    assert m.layers == vit().layers and type(m.native.fc).__name__ == "LoraCanonicalLinear"
    # negative control: a nonzero B moves the outputs
    m.load_state({"fc.lora_B": np.full((3, RANK), 0.1, np.float32)}, strict=False)
    assert not np.allclose(m.predict(x), base_out)


def test_adapted_native_layers_compute_base_plus_scaled_low_rank_term_as_numpy():
    m = mlp()
    x, _ = vectors()
    s0 = m.state()
    given = adapt(m, zero_b=False)
    (a0, b0), (a2, b2) = given["0"], given["2"]
    h = np.maximum(x @ s0["0.kernel"] + s0["0.bias"] + SCALE * (x @ a0.T) @ b0.T, 0)
    want = h @ s0["2.kernel"] + s0["2.bias"] + SCALE * (h @ a2.T) @ b2.T
    np.testing.assert_allclose(m.predict(x), want, rtol=1e-5, atol=1e-6)
    plain = np.maximum(x @ s0["0.kernel"] + s0["0.bias"], 0) @ s0["2.kernel"] + s0["2.bias"]
    assert not np.allclose(m.predict(x), plain, atol=1e-3), "negative control: the adapters matter"


def test_adapted_vit_equals_its_base_with_merged_kernels():
    m, merged = vit(), vit()
    x = images()
    given = adapt(m, zero_b=False)
    state = m.state()
    merged.load_state({f"{k}.weight": state[f"{k}.weight"] + SCALE * b @ a for k, (a, b) in given.items()},
                      strict=False)
    out = m.predict(x)
    np.testing.assert_allclose(out, merged.predict(x), rtol=1e-5, atol=1e-5 * np.abs(out).max())
    assert not np.allclose(out, vit().predict(x), atol=1e-3), "negative control: not the base's outputs"


def test_same_outputs_as_flax_lora_linear_and_lora_given_the_same_a_b():
    layer = nnx.Linear(6, 5, rngs=nnx.Rngs(3))
    kernel, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(RANK, 6)).astype(np.float32), rng.normal(size=(5, RANK)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(7, 6)).astype(np.float32))
    lora.add_lora(layer, SCALE, 0.0, a, b)
    ours = np.asarray(layer(x))
    flax_ll = nnx.LoRALinear(6, 5, lora_rank=RANK, rngs=nnx.Rngs(0))
    flax_ll.kernel[...], flax_ll.bias[...] = kernel, bias
    flax_ll.lora.lora_a[...], flax_ll.lora.lora_b[...] = a.T, SCALE * b.T    # Flax has no alpha: scale in B
    base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    base.kernel[...], base.bias[...] = kernel, bias
    flax_lora = nnx.LoRA(6, RANK, 5, base_module=base, rngs=nnx.Rngs(0))
    flax_lora.lora_a[...], flax_lora.lora_b[...] = a.T, SCALE * b.T
    for ref in (np.asarray(flax_ll(x)), np.asarray(flax_lora(x))):
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    flax_ll.lora.lora_b[...] = b.T   # negative control: without the scale they differ
    assert not np.allclose(ours, np.asarray(flax_ll(x)), rtol=1e-3)


def test_bad_calls_raise_and_change_nothing():
    m = mlp()
    t0, t2 = m._lora_targets()
    with pytest.raises(tl.TlcoreError, match=r"A \(rank, 4\) and B \(8, rank\)"):
        m._add_lora(t0, 1.0, 0.0, np.zeros((2, 8), np.float32), np.zeros((8, 2), np.float32))
    with pytest.raises(tl.TlcoreError, match="no LoRA adapter"):
        m._remove_lora("0")
    assert type(m.native.layers[0]) is nnx.Linear and ".lora_" not in "".join(m.state())
    m._add_lora(t0, 1.0, 0.0, *values(t0))
    with pytest.raises(tl.TlcoreError, match="already has a LoRA adapter"):
        m._add_lora(t0, 1.0, 0.0, *values(t0))
    with pytest.raises(tl.TlcoreError, match=r"dropout rate must be in \[0, 1\)"):
        m._add_lora(t2, 1.0, 1.0, *values(t2))
    assert sorted(n for n in m.state() if ".lora_" in n) == ["0.lora_A", "0.lora_B"]


# ---------------------------------------------------------------- training, removal, copies
def test_training_moves_only_the_adapters_and_equal_structures_share_the_compiled_step():
    x, y = vectors()
    m = mlp()
    adapt(m, zero_b=True)
    snap = tl.snapshot(m)
    first = fit(m, x, y)
    tl.assert_frozen(snap, m)
    changed = tl.changed_tensors(snap, m.state())
    assert set(changed) == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}, "negative control: adapters move"
    assert first.info["compilations"] == 1
    assert m._make_trainer(tl.optim.TrainSpec(tl.optim.Adam(lr=1e-2))).names == \
        ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"], "the step differentiates the adapters alone"
    other = mlp(seed=5)
    adapt(other, zero_b=False)
    assert jax.tree.structure(other.native) == jax.tree.structure(m.native)
    assert fit(other, x, y, epochs=1).info["compilations"] == 0, "same structure: no new compilation"
    scaled = mlp(seed=6)
    adapt(scaled, scale=0.5)
    assert jax.tree.structure(scaled.native) != jax.tree.structure(m.native), "the scale is static"


def test_remove_restores_the_base_computation_state_and_structure():
    m = vit()
    x = images()
    base_out, base_state = m.predict(x), m.state()
    treedef = jax.tree.structure(m.native)
    adapt(m, zero_b=False, dropout=0.1)
    adapted_out = m.predict(x)
    assert not np.allclose(adapted_out, base_out, atol=1e-4), "negative control: adapted outputs differ"
    for t in m._lora_targets():
        m._remove_lora(t.module)
    m._infos = None
    m._changed()
    m.freeze(tl.FreezePolicy.all())
    assert np.array_equal(m.predict(x), base_out)
    assert m.state().keys() == base_state.keys() and tl.changed_tensors(base_state, m.state()) == {}
    assert jax.tree.structure(m.native) == treedef and type(m.native.fc) is type(vit().native.fc)


def test_a_cut_copy_keeps_the_adapters_and_their_values_independently():
    m = vit()
    x = images()
    adapt(m, targets=m._lora_targets()[:4], zero_b=False, dropout=0.2)
    copy = m._cut(None, m.layers)
    state, copied = m.state(), copy.state()
    assert copied.keys() == state.keys() and tl.changed_tensors(state, copied) == {}
    assert sum(".lora_A" in n for n in copied) == 4
    assert np.array_equal(copy.predict(x), m.predict(x))
    assert [t.module for t in copy._lora_targets()] == [t.module for t in m._lora_targets()]
    copy.load_state({"blocks.0.attn.qkv.lora_B": np.zeros((48, RANK), np.float32)}, strict=False)
    assert not np.array_equal(copy.predict(x), m.predict(x)), "a copy: changing it leaves the original"
    assert m.state()["blocks.0.attn.qkv.lora_B"].any()


# ---------------------------------------------------------------- dropout
def test_dropout_acts_only_in_training_mode_with_its_own_reseeded_stream():
    m = mlp()
    t0 = m._lora_targets()[0]
    eye = np.eye(4, dtype=np.float32)
    base = m.state()
    m._add_lora(t0, 1.0, 0.5, eye, np.zeros((8, 4), np.float32))
    m._infos = None
    m._changed()
    m.freeze(ONLY_ADAPTERS)
    kinds = {t.name: t.kind for t in m.tensors}
    assert kinds["0.lora_rng.key"] == kinds["0.lora_rng.count"] == "rng"
    assert m._stochastic_layers() == ["0"]
    m.load_state({"0.kernel": np.zeros_like(base["0.kernel"]), "0.bias": np.zeros_like(base["0.bias"]),
                  "0.lora_B": np.eye(8, 4, dtype=np.float32)}, strict=False)
    layer = m.native.layers[0]
    x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (64, 4)).astype(np.float32))
    # the first four outputs are exactly the adapter's dropped input
    assert layer.deterministic and np.array_equal(np.asarray(layer(x))[:, :4], np.asarray(x)), "inference: no dropout"
    train = nnx.clone(layer)
    set_modes(train, training=True)
    first, second = np.asarray(train(x))[:, :4], np.asarray(train(x))[:, :4]
    xs = np.asarray(x)
    assert np.all((first == 0) | np.isclose(first, 2 * xs)) and 0.3 < (first == 0).mean() < 0.7
    assert not np.array_equal(first, second), "the stream advances"
    set_modes(train, training=False)
    assert np.array_equal(np.asarray(train(x))[:, :4], xs)
    # a run reseeds the stream (from the seed and the tensor's name), as every other stream
    y = np.zeros(4, np.int64)
    before = m.state()["0.lora_rng.key"]
    fit(m, np.asarray(x[:4]), y, epochs=1)
    assert not np.array_equal(m.state()["0.lora_rng.key"], before) and m.state()["0.lora_rng.count"] == 1


# ---------------------------------------------------------------- the public API
def test_finetune_with_an_adapter_trains_adapters_and_head_and_merges():
    base = vit()
    x = images(8)
    y = np.arange(8) % 3
    ft = tl.finetune(base, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(3),
                     adapter=tl.Adapter.lora(rank=RANK, alpha=4, targets=r"attn\.qkv"))
    assert list(ft.adapter.targets) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    snap = tl.snapshot(ft)
    fit(ft, x, y, epochs=1)
    tl.assert_frozen(snap, ft)
    assert set(tl.changed_tensors(snap, ft.state())) == {n for n, t in ft.trainable_mask().items() if t}
    out = ft.predict(x)
    ft.merge()
    assert not any(".lora_" in n for n in ft.state())
    np.testing.assert_allclose(ft.predict(x), out, rtol=1e-5, atol=1e-5 * np.abs(out).max())
