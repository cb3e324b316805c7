"""LoRA adapters on the torch backend (``backends/tlcore_torch/lora.py``), through the backend's three
primitives (``_lora_targets``, ``_add_lora``, ``_remove_lora``) and what the core does after adding
(reset the tensor list, apply the freeze policy): outputs against independent references (merged
weights, numpy, Hugging Face PEFT), what trains, removal, copies made by a cut."""
import copy
import re

import numpy as np
import pytest

import tlcore as tl
from tlcore.cut import kept_layers

torch = pytest.importorskip("torch", reason="the torch backend is not installed")
nn = torch.nn

#: trains the adapters only: every tensor whose name is not an adapter's is frozen
ADAPTERS_ONLY = tl.FreezePolicy.matching(r"^(?!.*\.lora_[AB]$)")
VIT = dict(depth=2, dim=32, heads=2, num_classes=3)


def vit(seed: int = 0) -> tl.Model:
    return tl.zoo.create("vit_tiny", backend="torch", seed=seed, **VIT)


def images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


def adapt(m: tl.Model, target, scale: float, a: np.ndarray, b: np.ndarray, dropout: float = 0.0,
          policy: tl.FreezePolicy = ADAPTERS_ONLY) -> None:
    """What the core does: add, then reset the tensor list and apply the freeze policy."""
    m._add_lora(target, scale, dropout, a, b)
    m._infos = None
    m._changed()
    m.freeze(policy)


def random_ab(target, rank: int, seed: int, b_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 0.3, (rank, target.in_features)).astype(np.float32)
    b = np.zeros((target.out_features, rank), np.float32) if b_zero else \
        rng.normal(0, 0.3, (target.out_features, rank)).astype(np.float32)
    return a, b


def merged_reference(m: tl.Model, adapters: dict[str, tuple[float, np.ndarray, np.ndarray]], x) -> np.ndarray:
    """The outputs of a fresh copy of ``m``'s base with each adapted kernel merged as
    ``W + scale * B @ A`` (no hooks involved): an independent reference in float64 merging."""
    ref = vit()
    state = {k: v for k, v in m.state().items() if ".lora_" not in k}
    for module, (scale, a, b) in adapters.items():
        w = state[f"{module}.weight"].astype(np.float64)
        state[f"{module}.weight"] = (w + scale * b.astype(np.float64) @ a.astype(np.float64)).astype(np.float32)
    ref.load_state(state)
    return ref.predict(x)


# ---------------------------------------------------------------------------------------------- targets
def test_targets_are_the_dense_layers_in_forward_order_and_the_head_is_left_out():
    m = vit()
    names = [t.module for t in m._lora_targets()]
    blocks = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert names == blocks + ["fc"]  # negative control: without a head, the classifier is a target
    qkv = m._lora_targets()[0]
    assert (qkv.kernel, qkv.in_features, qkv.out_features, qkv.transposed) == \
        ("blocks.0.attn.qkv.weight", 32, 96, False)
    assert m.state()[qkv.kernel].shape == (qkv.out_features, qkv.in_features)

    ft = tl.finetune(vit(), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(num_classes=5))
    assert ft.head is not None
    listed = [t.module for t in ft._lora_targets()]
    assert listed == blocks  # the head's own dense layer is not listed
    assert any(n.startswith(f"{ft.head}.") and n.endswith(".weight") for n in ft.state())


def test_adapted_layers_are_still_listed():
    m = vit()
    before = m._lora_targets()
    t = before[1]
    adapt(m, t, 1.0, *random_ab(t, 2, 0))
    assert m._lora_targets() == before


def test_multihead_attention_out_proj_is_not_a_target_because_it_never_runs():
    net = nn.Sequential(nn.Linear(6, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    m = tl.wrap(net, input_shape=(5, 6))
    names = [t.module for t in m._lora_targets()]
    assert "1.self_attn.out_proj" not in names
    assert names == ["0", "1.linear1", "1.linear2"]
    # the reason: a hook on out_proj never fires (MultiheadAttention reads its weight directly)
    calls = []
    net[1].self_attn.out_proj.register_forward_hook(lambda *args: calls.append(1))
    net[1].linear1.register_forward_hook(lambda *args: calls.append(2))
    net.eval()
    with torch.no_grad():
        net(torch.zeros(1, 5, 6))
    assert calls == [2]


# ---------------------------------------------------------------------------------------------- outputs
def test_b_zero_is_bit_identical_to_the_base_and_tensors_join_state_as_params():
    m = vit()
    x = images()
    base = m.predict(x)
    targets = m._lora_targets()
    for i, t in enumerate(targets[:-1]):
        adapt(m, t, 2.0, *random_ab(t, 4, i, b_zero=True))
    np.testing.assert_array_equal(m.predict(x), base)
    state = m.state()
    infos = {t.name: t for t in m.tensors}
    for t in targets[:-1]:
        assert state[f"{t.module}.lora_A"].shape == (4, t.in_features)
        assert state[f"{t.module}.lora_B"].shape == (t.out_features, 4)
        a_info = infos[f"{t.module}.lora_A"]
        assert (a_info.kind, a_info.layer) == ("param", infos[t.kernel].layer)
        assert m.trainable_mask()[f"{t.module}.lora_B"] and not m.trainable_mask()[t.kernel]
    assert "fc.lora_A" not in state
    # negative control: a nonzero B changes the outputs
    t = targets[0]
    a, b = random_ab(t, 4, 0)
    m._write_state({f"{t.module}.lora_B": b})
    assert not np.allclose(m.predict(x), base, atol=1e-4)


def test_adapted_outputs_equal_the_merged_weights_reference():
    m = vit()
    x = images()
    base = m.predict(x)
    adapters = {}
    for i, t in enumerate(m._lora_targets()[:-1]):
        scale = 0.5 + i
        a, b = random_ab(t, 3, 10 + i)
        adapt(m, t, scale, a, b)
        adapters[t.module] = (scale, a, b)
    out = m.predict(x)
    np.testing.assert_allclose(out, merged_reference(m, adapters, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, base, atol=1e-3)  # negative control: the adapters matter
    # and the wrong scale does not match the reference
    wrong = {k: (s * 2, a, b) for k, (s, a, b) in adapters.items()}
    assert not np.allclose(out, merged_reference(m, wrong, x), atol=1e-4)


def test_adapted_mlp_equals_a_numpy_forward_pass():
    m = tl.zoo.create("mlp", backend="torch", in_features=6, hidden=(7,), num_classes=3)
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    t = m._lora_targets()[0]
    assert (t.module, t.in_features, t.out_features) == ("fc1", 6, 7)
    a, b = random_ab(t, 2, 3)
    adapt(m, t, 1.5, a, b)
    s = {k: v.astype(np.float64) for k, v in m.state().items()}
    h = x @ s["fc1.weight"].T + s["fc1.bias"] + 1.5 * (x @ a.T.astype(np.float64)) @ b.T.astype(np.float64)
    expected = np.maximum(h, 0) @ s["fc.weight"].T + s["fc.bias"]
    np.testing.assert_allclose(m.predict(x), expected, rtol=1e-5, atol=1e-6)
    without = np.maximum(x @ s["fc1.weight"].T + s["fc1.bias"], 0) @ s["fc.weight"].T + s["fc.bias"]
    assert not np.allclose(m.predict(x), without, atol=1e-3)


def test_replacing_an_adapter_does_not_stack_two():
    m = vit()
    x = images()
    t = m._lora_targets()[0]
    a1, b1 = random_ab(t, 2, 1)
    a2, b2 = random_ab(t, 3, 2)
    adapt(m, t, 1.0, a1, b1)
    adapt(m, t, 1.0, a2, b2)
    np.testing.assert_allclose(m.predict(x), merged_reference(m, {t.module: (1.0, a2, b2)}, x), rtol=1e-5, atol=1e-5)
    assert m.state()[f"{t.module}.lora_A"].shape == (3, t.in_features)


def test_wrong_shapes_are_refused():
    m = vit()
    t = m._lora_targets()[0]
    with pytest.raises(ValueError, match="rank"):
        m._add_lora(t, 1.0, 0.0, np.zeros((2, t.out_features), np.float32), np.zeros((t.out_features, 2), np.float32))
    assert not any(".lora_" in k for k in m.state())


# ---------------------------------------------------------------------------------------------- training
def test_fit_moves_the_adapters_and_never_the_kernel():
    m = vit()
    x = images(16, seed=2)
    y = np.arange(16) % 3
    t = m._lora_targets()[0]
    adapt(m, t, 2.0, *random_ab(t, 4, 0, b_zero=True))
    before = m.state()
    snap = tl.snapshot(m)
    m.fit(x, y, epochs=2, batch_size=8, optimizer=tl.optim.AdamW(lr=1e-2))
    after = m.state()
    tl.assert_frozen(snap, m)
    assert all(np.array_equal(before[k], after[k]) for k in before if ".lora_" not in k)
    for name in (f"{t.module}.lora_A", f"{t.module}.lora_B"):
        assert not np.array_equal(before[name], after[name]), name
    # negative control: with the kernel trainable too, it moves and assert_frozen says so
    m.freeze(tl.FreezePolicy.none())
    m.fit(x, y, epochs=1, batch_size=8, optimizer=tl.optim.AdamW(lr=1e-2))
    assert not np.array_equal(after[t.kernel], m.state()[t.kernel])
    with pytest.raises(tl.FrozenWeightsChanged):
        tl.assert_frozen(snap, m)


def test_dropout_is_random_only_while_training():
    m = vit()
    x = images()
    t = m._lora_targets()[2]
    a, b = random_ab(t, 4, 5)
    assert m._stochastic_layers() == []
    adapt(m, t, 2.0, a, b, dropout=0.5)
    layer = m.native.get_submodule("blocks.0.mlp.fc1")
    assert m._stochastic_layers() == ["blocks.0.mlp.fc1"]  # the core's feature cache must not skip it
    # inference: no dropout, the same outputs as an adapter without dropout
    ref = vit()
    adapt(ref, t, 2.0, a, b)
    np.testing.assert_array_equal(m.predict(x), ref.predict(x))
    # training mode: the adapter's input is dropped (the base output is not)
    inp = torch.randn(8, 5, 32)
    layer.train()
    with torch.no_grad():
        out1, out2 = layer(inp), layer(inp)
        base = torch.nn.functional.linear(inp, layer.weight, layer.bias)
        full = base + 2.0 * (inp @ layer.lora_A.T) @ layer.lora_B.T
    assert not torch.equal(out1, out2)
    assert not torch.allclose(out1, full, atol=1e-4)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(inp), full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- removal, copies
def test_remove_restores_the_base_outputs_and_state():
    m = vit()
    x = images()
    base, base_state = m.predict(x), m.state()
    targets = m._lora_targets()
    for i, t in enumerate(targets[:3]):
        adapt(m, t, 2.0, *random_ab(t, 4, i))
    adapted = m.predict(x)
    assert not np.allclose(adapted, base, atol=1e-3)  # negative control
    m._remove_lora(targets[0].module)
    m._infos = None
    m._changed()
    m.freeze(ADAPTERS_ONLY)
    assert not any(k.startswith(f"{targets[0].module}.lora_") for k in m.state())
    assert f"{targets[1].module}.lora_A" in m.state()
    for t in targets[1:3]:
        m._remove_lora(t.module)
    m._infos = None
    m._changed()
    m.freeze(tl.FreezePolicy.none())
    np.testing.assert_array_equal(m.predict(x), base)
    assert m.state().keys() == base_state.keys()
    assert not m.native.get_submodule(targets[0].module)._forward_hooks
    m._remove_lora(targets[0].module)  # removing twice does nothing
    np.testing.assert_array_equal(m.predict(x), base)


def test_a_copy_made_by_a_cut_keeps_its_own_adapters():
    m = vit()
    x = images()
    base = m.predict(x)
    t = m._lora_targets()[0]
    a, b = random_ab(t, 4, 7)
    adapt(m, t, 2.0, a, b)
    adapted = m.predict(x)
    c = m._cut(None, m.layers)
    np.testing.assert_array_equal(c.predict(x), adapted)
    assert f"{t.module}.lora_B" in c.state()
    # the copy's adapter is its own: zeroing its B gives the base back there, not on the original
    c._write_state({f"{t.module}.lora_B": np.zeros_like(b)})
    np.testing.assert_array_equal(c.predict(x), base)
    np.testing.assert_array_equal(m.predict(x), adapted)
    c._remove_lora(t.module)
    assert f"{t.module}.lora_B" in m.state()
    # a cut that slices the model (before its pool) keeps the adapter too
    sliced = m._cut("norm", kept_layers(m.layers, "norm"))
    assert f"{t.module}.lora_A" in sliced.state() and "fc.weight" not in sliced.state()
    plain = vit()
    plain_sliced = plain._cut("norm", kept_layers(plain.layers, "norm"))
    assert not np.allclose(sliced.predict(x), plain_sliced.predict(x), atol=1e-3)
    plain_sliced._add_lora(t, 2.0, 0.0, a, b)
    np.testing.assert_array_equal(sliced.predict(x), plain_sliced.predict(x))


# ---------------------------------------------------------------------------------------------- Hugging Face
def hf_model(family: str) -> nn.Module:
    T = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    if family == "bert":
        return T.BertModel(T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0))
    return T.GPT2Model(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0))


def tokens(n: int = 4, t: int = 9, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(t)[None] < rng.integers(4, t + 1, (n, 1))).astype(np.int64)
    return {"input_ids": rng.integers(2, 100, (n, t)) * mask, "attention_mask": mask}


PEFT_CASES = {
    "bert": dict(target_modules=["query", "value", "dense"]),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
}


def peft_pair(family: str):
    """A tiny Hugging Face model's copy (for tlcore) and the model itself under PEFT's LoRA (random A and B)."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    base = hf_model(family)
    ours_native = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **PEFT_CASES[family])
    reference = peft.get_peft_model(base, config)
    reference.eval()
    return ours_native, reference


@pytest.mark.parametrize("family", sorted(PEFT_CASES))
def test_outputs_match_hugging_face_peft(family):
    ours_native, reference = peft_pair(family)
    x = tokens()
    with torch.no_grad():
        expected = reference(**{k: torch.from_numpy(v) for k, v in x.items()}).last_hidden_state.numpy()

    # PEFT's adapters: "base_model.model.<module>.lora_A.default.weight" (rank, in) / "...lora_B..." (out, rank)
    found = {}
    for key, value in reference.state_dict().items():
        hit = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.default\.weight", key)
        if hit:
            found.setdefault(hit[1], {})[hit[2]] = value.detach().numpy()
    assert found and all(v["B"].any() for v in found.values())  # init_lora_weights=False: B is random

    m = tl.wrap(ours_native)
    unadapted = m.predict(x)
    assert not np.allclose(unadapted, expected, atol=1e-4)  # negative control: PEFT's adapters matter
    targets = {t.module: t for t in m._lora_targets()}
    assert set(found) <= set(targets)
    if family == "gpt2":
        assert all(targets[n].transposed for n in found)
        assert m.state()[targets["h.0.attn.c_attn"].kernel].shape == (32, 96)  # Conv1D keeps (in, out)
    for module, ab in found.items():
        t = targets[module]
        assert ab["A"].shape == (4, t.in_features) and ab["B"].shape == (t.out_features, 4)
        config = reference.peft_config["default"]
        m._add_lora(t, config.lora_alpha / config.r, 0.0, ab["A"], ab["B"])
    m._infos = None
    m._changed()
    m.freeze(ADAPTERS_ONLY)
    out = m.predict(x)
    scale = np.abs(expected).max()
    assert np.abs(out - expected).max() <= 1e-6 * scale
    # and with half PEFT's scale it does not match (the check can fail)
    for module, ab in found.items():
        m._add_lora(targets[module], 1.0, 0.0, ab["A"], ab["B"])
    assert np.abs(m.predict(x) - expected).max() > 1e-3 * scale


# ---------------------------------------------------------------------------------------------- the public API
def test_finetune_with_an_adapter_trains_only_adapters_and_head_then_merges_and_round_trips(tmp_path):
    x, y = images(16, seed=3), np.arange(16) % 3
    spec = tl.Adapter.lora(rank=4, alpha=8, targets=r"attn\.(qkv|proj)")
    ft = tl.finetune(vit(), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(num_classes=3), adapter=spec)
    plain = tl.finetune(vit(), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(num_classes=3))
    np.testing.assert_array_equal(ft.predict(x), plain.predict(x))  # B = 0: the base's outputs, bit for bit
    lora = sorted(n for n in ft.state() if ".lora_" in n)
    assert lora == sorted(f"blocks.{i}.attn.{m}.lora_{ab}" for i in range(2) for m in ("qkv", "proj") for ab in "AB")
    mask = ft.trainable_mask()
    assert all(mask[n] for n in lora) and not mask["blocks.0.attn.qkv.weight"]

    snap = tl.snapshot(ft)
    before = ft.state()
    ft.fit(x, y, epochs=2, batch_size=8, optimizer=tl.optim.AdamW(lr=1e-2))
    tl.assert_frozen(snap, ft)
    after = ft.state()
    assert all(not np.array_equal(before[n], after[n]) for n in lora)
    adapted = ft.predict(x)
    assert not np.allclose(adapted, plain.predict(x), atol=1e-4)

    path = tmp_path / "ft.safetensors"
    ft.save(path)
    np.testing.assert_array_equal(tl.load(path, backend="torch").predict(x), adapted)

    ft.merge()
    assert not any(".lora_" in n for n in ft.state())
    assert all(not m._forward_hooks for m in ft.native.modules())  # no hook is left on a merged model
    np.testing.assert_allclose(ft.predict(x), adapted, rtol=1e-5, atol=1e-5)
    ft.unmerge()
    np.testing.assert_array_equal(ft.predict(x), adapted)
    np.testing.assert_array_equal(ft.state()["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("family", sorted(PEFT_CASES))
def test_a_saved_peft_adapter_loads_through_from_peft_with_the_same_outputs(family, tmp_path):
    ours_native, reference = peft_pair(family)
    reference.save_pretrained(tmp_path)
    x = tokens(seed=1)
    with torch.no_grad():
        expected = reference(**{k: torch.from_numpy(v) for k, v in x.items()}).last_hidden_state.numpy()
    plain = tl.wrap(copy.deepcopy(ours_native)).predict(x)
    assert not np.allclose(plain, expected, atol=1e-4)  # negative control
    ft = tl.finetune(tl.wrap(ours_native), adapter=tl.Adapter.from_peft(tmp_path / "adapter_model.safetensors"))
    assert ft.adapter.scale == 2.0
    out = ft.predict(x)
    assert np.abs(out - expected).max() <= 1e-6 * np.abs(expected).max()
