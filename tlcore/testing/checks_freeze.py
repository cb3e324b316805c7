"""Conformance: frozen means bit-identical, for every optimizer, policy and training pattern.

Negative controls in the same file prove the check can fail: trainable tensors do change,
``FreezePolicy.none()`` changes everything, a frozen tensor changed by hand is reported, and a
different seed trains differently.
"""
from __future__ import annotations

import numpy as np

import tlcore as tl

from . import BASE_LAYERS, layer_of, reference_finetune, sample_data, tensor_kinds
from ._kit import check

OPTIMIZERS = {
    "sgd_momentum_wd": tl.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam": tl.optim.Adam(lr=1e-2),
    "adamw_wd": tl.optim.AdamW(lr=1e-2, weight_decay=0.05),
    "rmsprop": tl.optim.RMSprop(lr=1e-2),
}

#: policy, and the top-level layers whose tensors it must freeze (BatchNorm statistics included)
POLICIES = {
    "all": (tl.FreezePolicy.all(), {"conv1", "bn1", "conv2", "bn2"}),
    "up_to_bn1": (tl.FreezePolicy.up_to("bn1"), {"conv1", "bn1"}),
    "matching_conv": (tl.FreezePolicy.matching(r"^conv"), {"conv1", "conv2"}),
    "all_bn_train": (tl.FreezePolicy.all(bn="train"), {"conv1", "conv2"}),
}


def expected_frozen(model: tl.Model, frozen_layers: set[str]) -> set[str]:
    """Names that must be frozen, from the layer names alone (independent of the policy code)."""
    kinds = tensor_kinds(model)
    return {n for n in model.state() if layer_of(n) in frozen_layers and kinds[n] != "rng"}


def fit(model, x, y, optimizer=None, **kw):
    kw.setdefault("cache_features", False)
    return model.fit(x, y, epochs=kw.pop("epochs", 1), batch_size=16,
                     optimizer=optimizer or tl.optim.Adam(lr=1e-2), progress=False, **kw)


def assert_trainable_changed(snap, model):
    """Negative control: every trainable parameter (and statistic) moved during training."""
    changed = tl.changed_tensors(snap, model.state())
    kinds = tensor_kinds(model)
    should = [n for n, t in model.trainable_mask().items() if t and kinds[n] in ("param", "bn_param", "bn_stat")]
    assert should, "no trainable tensor at all: the test would prove nothing"
    unchanged = [n for n in should if n not in changed]
    assert not unchanged, f"trainable tensors did not change: {unchanged}"


@check(cases={name: {"policy": name} for name in POLICIES})
def check_trainable_mask_matches_policy(backend, policy):
    policy, frozen_layers = POLICIES[policy]
    ft = reference_finetune(backend, policy)
    mask = ft.trainable_mask()
    assert set(mask) == set(ft.state())
    assert {n for n, t in mask.items() if not t} == expected_frozen(ft, frozen_layers)


@check(cases={f"{o}-{p}": {"opt": o, "policy": p} for o in OPTIMIZERS for p in POLICIES})
def check_frozen_tensors_bit_identical(backend, opt, policy):
    policy, frozen_layers = POLICIES[policy]
    ft = reference_finetune(backend, policy)
    x, y = sample_data(ft)
    snap = tl.snapshot(ft)
    fit(ft, x, y, OPTIMIZERS[opt])
    checked = tl.assert_frozen(snap, ft)
    assert set(checked) == expected_frozen(ft, frozen_layers)
    assert_trainable_changed(snap, ft)


@check
def check_frozen_with_clip_grad_norm(backend):
    ft = reference_finetune(backend)
    x, y = sample_data(ft)
    snap = tl.snapshot(ft)
    fit(ft, x, y, tl.optim.AdamW(lr=1e-2, weight_decay=0.05), clip_grad_norm=0.1)
    assert tl.assert_frozen(snap, ft)
    assert_trainable_changed(snap, ft)


@check
def check_frozen_after_two_consecutive_fits(backend):
    ft = reference_finetune(backend, tl.FreezePolicy.up_to("bn1"))
    x, y = sample_data(ft)
    snap = tl.snapshot(ft)
    fit(ft, x, y, OPTIMIZERS["sgd_momentum_wd"])
    middle = tl.snapshot(ft)
    fit(ft, x, y, OPTIMIZERS["sgd_momentum_wd"])
    tl.assert_frozen(snap, ft)
    assert_trainable_changed(middle, ft)


@check
def check_unfreeze_then_refreeze_between_fits(backend):
    ft = reference_finetune(backend)
    x, y = sample_data(ft)
    fit(ft, x, y)
    before_unfreeze = tl.snapshot(ft)
    ft.freeze(tl.FreezePolicy.none())
    assert all(ft.trainable_mask()[n] for n in ft.state() if tensor_kinds(ft)[n] != "buffer")
    fit(ft, x, y)
    changed = tl.changed_tensors(before_unfreeze, ft.state())
    base = [n for n in ft.state() if layer_of(n) in BASE_LAYERS]
    assert all(n in changed for n in base), "unfrozen base tensors must train"
    ft.freeze(tl.FreezePolicy.all())
    refrozen = tl.snapshot(ft)
    fit(ft, x, y, tl.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-2))
    assert set(tl.assert_frozen(refrozen, ft)) == expected_frozen(ft, set(BASE_LAYERS))
    assert_trainable_changed(refrozen, ft)


@check
def check_policy_none_changes_everything(backend):
    ft = reference_finetune(backend, tl.FreezePolicy.none())
    x, y = sample_data(ft)
    snap = tl.snapshot(ft)
    # weight decay moves even conv biases whose gradient the following BatchNorm cancels
    fit(ft, x, y, tl.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-2))
    changed = tl.changed_tensors(snap, ft.state())
    kinds = tensor_kinds(ft)
    movable = [n for n in snap if kinds[n] in ("param", "bn_param", "bn_stat")]
    assert [n for n in movable if n not in changed] == []
    assert tl.assert_frozen(snap, ft) == []  # nothing is frozen, so nothing is checked


@check
def check_assert_frozen_detects_a_tensor_changed_by_hand(backend):
    ft = reference_finetune(backend)
    snap = tl.snapshot(ft)
    name = next(n for n, t in ft.trainable_mask().items() if not t and layer_of(n) == "conv2")
    ft.load_state({name: snap[name] + 0.5}, strict=False)
    try:
        tl.assert_frozen(snap, ft)
    except tl.FrozenWeightsChanged as e:
        assert list(e.changed) == [name] and abs(e.changed[name] - 0.5) < 1e-6 and name in str(e)
    else:
        raise AssertionError("assert_frozen missed a frozen tensor changed by hand")


@check
def check_bn_train_updates_statistics_inside_the_frozen_part(backend):
    ft = reference_finetune(backend, tl.FreezePolicy.all(bn="train"))
    x, y = sample_data(ft)
    snap = tl.snapshot(ft)
    fit(ft, x, y)
    kinds = tensor_kinds(ft)
    stats = [n for n in snap if kinds[n] == "bn_stat" and layer_of(n) in ("bn1", "bn2")]
    assert stats and all(n in tl.changed_tensors(snap, ft.state()) for n in stats)


@check
def check_training_is_reproducible_and_the_seed_matters(backend):
    runs = []
    for seed in (3, 3, 4):
        ft = reference_finetune(backend, tl.FreezePolicy.up_to("bn1"))
        x, y = sample_data(ft)
        fit(ft, x, y, tl.optim.AdamW(lr=1e-2), epochs=2, seed=seed)
        runs.append(ft.state())
    assert tl.changed_tensors(runs[0], runs[1]) == {}
    assert tl.changed_tensors(runs[0], runs[2]), "negative control: another seed must train differently"


@check
def check_finetune_leaves_the_original_model_untouched(backend):
    original = tl.get_backend(backend).reference_model(seed=0)
    snap = tl.snapshot(original)
    ft = tl.finetune(original, cut=tl.LayerCut(at="relu2"), head=tl.Head.linear(3), freeze=tl.FreezePolicy.none())
    x, y = sample_data(ft)
    fit(ft, x, y)
    assert tl.changed_tensors(snap, original.state()) == {}
    assert tl.changed_tensors(snap, ft.state(), [n for n in snap if layer_of(n) in BASE_LAYERS])


@check
def check_optimizer_state_only_for_trainable_tensors(backend):
    ft = reference_finetune(backend)
    x, y = sample_data(ft)
    hist = fit(ft, x, y, tl.optim.Adam(lr=1e-2))
    state, mask = ft.state(), ft.trainable_mask()
    trainable = [n for n, t in mask.items() if t and tensor_kinds(ft)[n] in ("param", "bn_param")]
    trainable_bytes = sum(state[n].nbytes for n in trainable)
    # Adam keeps two moments per trainable tensor, plus at most a few scalar counters
    assert 2 * trainable_bytes <= hist.info["optimizer_state_bytes"] <= 2 * trainable_bytes + 8 * len(trainable) + 64


@check
def check_feature_cache_matches_uncached_training(backend):
    results = {}
    for cache in (False, True):
        ft = reference_finetune(backend)
        x, y = sample_data(ft, n=40)
        hist = ft.fit(x, y, epochs=4, batch_size=16, optimizer=tl.optim.Adam(lr=1e-2), seed=1,
                      progress=False, cache_features=cache)
        results[cache] = (ft.state(), hist)
    assert results[True][1].info["cache_features"] == "used"
    assert results[False][1].info["cache_features"] == "off"
    (s0, _), (s1, _) = results[False], results[True]
    for name in s0:
        np.testing.assert_allclose(s1[name], s0[name], rtol=1e-5, atol=1e-5, err_msg=name)


@check
def check_feature_cache_refused_when_the_frozen_part_is_not_deterministic(backend):
    ft = reference_finetune(backend, tl.FreezePolicy.up_to("bn1"))
    x, y = sample_data(ft)
    assert "trainable" in fit(ft, x, y, cache_features="auto").info["cache_features"]
    try:
        fit(ft, x, y, cache_features=True)
    except tl.FeatureCacheRefused as e:
        assert "trainable" in str(e)
    else:
        raise AssertionError("cache_features=True with a trainable base must be refused")
    model = tl.get_backend(backend).reference_model(seed=0)
    with_dropout = tl.finetune(model, cut=tl.LayerCut(at="dropout"), head=tl.Head.linear(3))
    info = fit(with_dropout, x, y, cache_features="auto").info["cache_features"]
    assert info.startswith("refused") and "random" in info
