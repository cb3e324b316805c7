"""Conformance: LoRA adapters (``tl.Adapter``) on a zoo ViT: the adapted model starts at its base's
outputs, training changes only adapters and head, merge/unmerge are exact, and an adapter saved on one
backend loads onto the same base on every other installed backend.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

import tlcore as tl
from tlcore.schedules import Cosine

from ._kit import check
from .checks_errors import raises

#: a small ViT (2 blocks of width 32 on 16x16 images), the same weights on every backend
VIT = {"dim": 32, "depth": 2, "heads": 2, "image_size": 16, "patch_size": 4}
TARGETS = r"attn\.(qkv|proj)|mlp\.fc\d"
ADAPTED = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def vit(backend: str, seed: int = 0) -> tl.Model:
    return tl.zoo.create("vit_tiny", backend=backend, seed=seed, **VIT)


def adapted(backend: str, adapter: tl.Adapter | None = None, seed: int = 0, **kw) -> tl.Model:
    adapter = adapter or tl.Adapter.lora(rank=4, alpha=8, targets=TARGETS)
    return tl.finetune(vit(backend, seed), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(5), adapter=adapter, **kw)


def vit_data(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 16, 16, 3), dtype=np.float32), rng.integers(0, 5, n)


def _fit(ft, x, y, **kw):
    kw = {"epochs": 2, "batch_size": 8, "progress": False, "seed": 1,
          "optimizer": tl.optim.AdamW(lr=1e-2, weight_decay=0.01), **kw}
    return ft.fit(x, y, **kw)


def lora_names(model: tl.Model) -> list[str]:
    return [n for n in model.state() if ".lora_" in n]


@check
def check_lora_starts_at_the_base_outputs(backend):
    """B = 0: the adapted model's outputs equal the base's bit for bit; adapters and head are what
    trains, every base tensor is frozen, and the adapter tensors have PEFT's layouts."""
    x, _ = vit_data(8)
    plain = tl.finetune(vit(backend), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(5))
    ft = adapted(backend)
    assert np.array_equal(ft.predict(x), plain.predict(x))
    state, mask = ft.state(), ft.trainable_mask()
    assert sorted(lora_names(ft)) == sorted(f"{m}.lora_{ab}" for m in ADAPTED for ab in "AB")
    assert list(ft.adapter.targets) == ADAPTED
    for m in ADAPTED:
        out, inp = state[f"{m}.weight"].shape
        assert state[f"{m}.lora_A"].shape == (4, inp) and state[f"{m}.lora_B"].shape == (out, 4)
        assert not state[f"{m}.lora_B"].any() and state[f"{m}.lora_A"].any()
    assert {n for n, t in mask.items() if t} == {*lora_names(ft), "head.out.weight", "head.out.bias"}
    assert tl.changed_tensors(plain.state(), {k: v for k, v in state.items() if ".lora_" not in k}) == {}
    lora_params = sum(state[n].size for n in lora_names(ft))
    assert f"on 8 dense layers ({lora_params:,} params, trainable)" in str(ft.summary())
    assert ft.count_params()[0] == lora_params + plain.count_params()[0]
    # negative control: nonzero B moves the outputs
    ft.load_state({f"{ADAPTED[0]}.lora_B": np.full_like(state[f"{ADAPTED[0]}.lora_B"], 0.1)}, strict=False)
    assert not np.allclose(ft.predict(x), plain.predict(x))


@check(cases={"adamw": {"opt": "adamw"}, "sgd_momentum_dropout": {"opt": "sgd"}})
def check_lora_training_keeps_the_base_bit_identical(backend, opt):
    """Training changes adapters and head only; the optimizer holds state for them alone."""
    spec = tl.Adapter.lora(rank=4, alpha=8, targets=TARGETS, dropout=0.0 if opt == "adamw" else 0.2)
    ft = adapted(backend, spec)
    x, y = vit_data()
    snap = tl.snapshot(ft)
    optimizer = tl.optim.AdamW(lr=1e-2) if opt == "adamw" else tl.optim.SGD(lr=0.05, momentum=0.9)
    hist = _fit(ft, x, y, optimizer=optimizer)
    tl.assert_frozen(snap, ft)
    changed = tl.changed_tensors(snap, ft.state())
    assert set(changed) == {n for n, t in ft.trainable_mask().items() if t}, "every adapter and head tensor trains"
    assert np.isfinite(hist["loss"]).all()
    trainable = sum(ft.state()[n].size for n, t in ft.trainable_mask().items() if t)
    slots = 2 if opt == "adamw" else 1
    held = hist.info["optimizer_state_bytes"]
    assert 4 * slots * trainable <= held <= 4 * slots * trainable + 64 * len(changed) + 256, (held, trainable)
    full = tl.finetune(vit(backend), cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(5), freeze=tl.FreezePolicy.none())
    full_bytes = _fit(full, x[:8], y[:8], epochs=1, optimizer=optimizer).info["optimizer_state_bytes"]
    assert held < full_bytes / 2, (held, full_bytes)


@check
def check_lora_merge_and_unmerge_are_exact(backend):
    """merge(): a plain model within 1e-6 of the adapted one; unmerge(): every tensor back bit for bit."""
    ft = adapted(backend, tl.Adapter.lora(rank=4, alpha=8, targets=TARGETS, dropout=0.1))
    x, y = vit_data()
    _fit(ft, x, y, epochs=1)
    before, out = ft.state(), ft.predict(x)
    merged = ft.merge()
    assert merged is ft and lora_names(merged) == [] and merged.adapter is None
    assert set(merged.state()) == {k for k in before if ".lora_" not in k}
    changed = tl.changed_tensors({k: v for k, v in before.items() if ".lora_" not in k}, merged.state())
    assert set(changed) == {f"{m}.weight" for m in ADAPTED}, "exactly the adapted kernels change"
    np.testing.assert_allclose(merged.predict(x), out, rtol=1e-6, atol=1e-6 * np.abs(out).max())
    assert {n for n, t in merged.trainable_mask().items() if t} == {"head.out.weight", "head.out.bias"}
    snap = merged.state()
    with raises(tl.AdapterError, "merged already"):
        merged.merge()
    assert tl.changed_tensors(snap, merged.state()) == {}
    restored = merged.unmerge()
    assert tl.changed_tensors(before, restored.state()) == {} and set(restored.state()) == set(before)
    assert np.array_equal(restored.predict(x), out)
    restored.merge(keep_base=False)
    with raises(tl.AdapterError, "keep_base=False"):
        restored.unmerge()


@check
def check_lora_adapter_loads_on_every_backend(backend):
    """An adapter trained here loads onto the same zoo base on each installed backend (outputs within
    1e-5), refuses another base, and a whole-model checkpoint keeps its adapters."""
    from . import selected_backends

    ft = adapted(backend)
    x, y = vit_data()
    _fit(ft, x, y, epochs=1)
    out = ft.predict(x)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.safetensors")
        ft.save_adapter(path)
        for other in selected_backends():
            base = vit(other)
            snap = tl.snapshot(base)
            loaded = tl.load_adapter(base, path)
            assert tl.changed_tensors(snap, base.state()) == {}, "the base itself is not changed"
            np.testing.assert_allclose(loaded.predict(x), out, rtol=1e-5, atol=1e-5 * np.abs(out).max())
            assert sorted(lora_names(loaded)) == sorted(lora_names(ft))
        with raises(tl.AdapterError, "another base"):
            tl.load_adapter(vit(backend, seed=1), path)
        with raises(tl.CheckpointError, "load_adapter"):
            tl.load(path)
        whole = os.path.join(tmp, "whole.safetensors")
        ft.save(whole)
        back = tl.load(whole)
        assert back.adapter == ft.adapter and tl.changed_tensors(ft.state(), back.state()) == {}
        assert back.trainable_mask() == ft.trainable_mask()
        with raises(tl.AdapterError, "not a LoRA adapter file"):
            tl.load_adapter(vit(backend), whole)


@check
def check_lora_with_recipes(backend):
    """A cosine schedule with layer decay and staged unfreezing: adapters train from the first step,
    base tensors frozen until their stage (the negative control: they change once it comes)."""
    ft = adapted(backend)
    x, y = vit_data(16)
    groups = tl.LayerGroups.auto(ft)
    opt = tl.optim.AdamW(lr=Cosine(peak_lr=1e-2, total_steps=8, warmup_steps=2), lr_mult=tl.LayerDecay(0.5, groups))
    from tlcore.groups import plan_params

    rate = {name: mult for name, _, mult, _ in plan_params(opt, ft).entries}
    assert rate["blocks.0.attn.qkv.lora_A"] < rate["blocks.1.attn.qkv.lora_A"] < rate["head.out.weight"] == 1.0
    assert rate["blocks.0.attn.qkv.lora_B"] == rate["blocks.0.attn.qkv.weight"], "adapters decay with their layer"
    plan = tl.UnfreezeSchedule([(0, tl.FreezePolicy.all()), (1, tl.FreezePolicy.none())])
    for epochs in (1, 2):
        ft = adapted(backend)
        snap = tl.snapshot(ft)
        ft.fit(x, y, epochs=epochs, batch_size=8, optimizer=opt, freeze=plan, progress=False)
        changed = tl.changed_tensors(snap, ft.state())
        assert set(changed) >= set(lora_names(ft))
        base_changed = [n for n in changed if ".lora_" not in n and not n.startswith("head.")]
        assert bool(base_changed) == (epochs == 2), "the base is frozen until the stage that unfreezes it"


@check
def check_lora_bad_input(backend):
    """Each a named tl.AdapterError before anything changes."""
    base = vit(backend)
    snap = tl.snapshot(base)
    for kwargs, match in (({"rank": 0}, "rank must be"), ({"rank": 2, "alpha": -1.0}, "alpha"),
                          ({"rank": 2, "dropout": 1.0}, "dropout"), ({"rank": 2, "targets": "(.*.*)*Z"}, "LoRA targets")):
        with raises(tl.AdapterError, match):
            tl.Adapter.lora(**kwargs)
    with raises(tl.AdapterError, r"match no dense layer; candidates: 'blocks\.0\.attn\.qkv'"):
        tl.finetune(base, head=tl.Head.linear(5), adapter=tl.Adapter.lora(rank=2, targets="no_such_layer"))
    with raises(tl.AdapterError, r"rank 64 exceeds the smaller width of 'blocks\.0\.attn\.qkv' \(32 -> 96\)"):
        tl.finetune(base, head=tl.Head.linear(5), adapter=tl.Adapter.lora(rank=64, targets=r"qkv"))
    with raises(tl.AdapterError, "not dense layers"):
        tl.finetune(base, head=tl.Head.linear(5), adapter=tl.Adapter.lora(rank=2, targets=["blocks.0.norm1"]))
    assert tl.changed_tensors(snap, base.state()) == {}
    ft = adapted(backend)
    with raises(tl.AdapterError, "merge\\(\\) them first"):
        tl.finetune(ft, cut=tl.LayerCut(drop_last=1))
    with raises(tl.AdapterError, "no LoRA adapters"):
        base.merge()


@check
def check_lora_run_resumes_exactly(backend):
    """A resumable run of an adapted model (``checkpoint_dir``) comes back with its adapters and ends
    as the run that was never stopped."""
    ft = adapted(backend)
    x, y = vit_data(16)
    with tempfile.TemporaryDirectory() as tmp:
        _fit(ft, x, y, epochs=1, checkpoint_dir=tmp)
        back = tl.resume(tmp)
        assert back.adapter == ft.adapter and back.trainable_mask() == ft.trainable_mask()
        assert tl.changed_tensors(ft.state(), back.state()) == {}
        _fit(back, x, y, epochs=2, checkpoint_dir=tmp)
    _fit(ft, x, y, epochs=1)
    assert tl.changed_tensors(ft.state(), back.state()) == {}
