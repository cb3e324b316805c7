"""Conformance: fine-tuning recipes (schedules, layer-wise rates, no_decay, staged unfreezing,
callbacks) and fits that continue where the last one stopped, the same on every backend.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

import tlcore as tl
from tlcore.schedules import Cosine

from . import layer_of, reference_finetune, sample_data
from ._kit import check
from .checks_errors import raises
from .checks_numerics import BATCH, N, head_on_pooled_features
from .reference import ReferenceOptimizer


def _fit(ft, x, y, **kw):
    kw = {"batch_size": 8, "progress": False, "seed": 4, **kw}
    return ft.fit(x, y, **kw)


@check(cases={"uncached": {"cache": False}, "cached": {"cache": "auto"}})
def check_two_fits_equal_one_fit_twice_as_long(backend, cache):
    """As Keras' fit: optimizer state, step (the schedule goes on) and RNGs carry over; reset=True
    starts afresh (the negative control)."""
    opt = tl.optim.AdamW(lr=Cosine(peak_lr=2e-2, total_steps=12, warmup_steps=2), weight_decay=0.05)
    states = []
    for calls in ((2,), (1, 1)):
        ft = reference_finetune(backend, dropout=0.3)
        x, y = sample_data(ft, n=24)
        lrs = []
        for epochs in calls:
            hist = _fit(ft, x, y, epochs=epochs, optimizer=opt, cache_features=cache)
            lrs += hist.info["lr_steps"]
        assert hist.info["cache_features"] == ("used" if cache else "off")
        np.testing.assert_allclose(lrs, opt.schedule.lr_at(np.arange(6)), rtol=1e-12)
        states.append(ft.state())
    assert tl.changed_tensors(states[0], states[1]) == {}
    _fit(ft, x, y, epochs=1, optimizer=opt, cache_features=cache, reset=True)
    again = reference_finetune(backend, dropout=0.3)
    _fit(again, x, y, epochs=1, optimizer=opt, cache_features=cache)
    fresh = again.state()
    restarted = reference_finetune(backend, dropout=0.3)
    restarted.load_state(states[1])
    _fit(restarted, x, y, epochs=1, optimizer=opt, cache_features=cache, reset=True)
    assert tl.changed_tensors(restarted.state(), ft.state()) == {}, "reset=True: the same as a new run from there"
    assert tl.changed_tensors(fresh, ft.state()), "negative control: continuing and restarting differ"


@check
def check_schedule_rates_are_what_the_framework_applies(backend):
    opt = tl.optim.SGD(lr=tl.schedules.OneCycle(max_lr=0.1, total_steps=10), momentum=0.9)
    ft = head_on_pooled_features(backend, 3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, *ft.input_shape)).astype(np.float32)
    y = rng.integers(0, 3, N)
    hist = ft.fit(x, y, epochs=3, batch_size=BATCH, optimizer=opt, progress=False, cache_features=False)
    steps = 3 * (N // BATCH)
    np.testing.assert_allclose(hist.info["lr_steps"], opt.schedule.lr_at(np.arange(steps)), rtol=1e-12)
    assert hist["lr"][-1] == hist.info["lr_steps"][-1]
    applied = ft._run.live[0].applied_lr()
    want = opt.schedule.lr_at(steps - 1)
    assert applied and all(abs(v - want) <= 1e-7 * want for v in applied.values()), (applied, want)


@check
def check_layer_decay_and_no_decay_steps_match_numpy_reference(backend):
    """Two groups (weights, biases) of a linear head: LayerDecay 0.5 (the weight at half the rate),
    no_decay="1d" (the bias without decay), AdamW (decoupled decay at each group's own rate)."""
    lr, wd = 0.05, 0.1
    ft = head_on_pooled_features(backend, 3)
    groups = tl.LayerGroups([r"weight$|kernel$|scale$|gamma$", r"bias$|beta$"])  # every backend's names
    opt = tl.optim.AdamW(lr=lr, weight_decay=wd, lr_mult=tl.LayerDecay(0.5, groups), no_decay="1d")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, *ft.input_shape)).astype(np.float32)
    y = rng.integers(0, 3, N)
    table = ft.describe_groups(opt)
    assert "0.5" in table and "kernel$" in table and "(no_decay)" in table  # the 1-d BatchNorm weights
    feats = ft.features(x).astype(np.float64)
    state = ft.state()
    params = {"weight": state["head.out.weight"].astype(np.float64), "bias": state["head.out.bias"].astype(np.float64)}
    ref = {"weight": ReferenceOptimizer(tl.optim.AdamW(lr=lr * 0.5, weight_decay=wd)),
           "bias": ReferenceOptimizer(tl.optim.AdamW(lr=lr, weight_decay=0.0))}
    for start in range(0, N, BATCH):
        b = slice(start, start + BATCH)
        g = tl.losses.CrossEntropy().reference_grad(feats[b] @ params["weight"].T + params["bias"], y[b])
        grads = {"weight": g.T @ feats[b], "bias": g.sum(axis=0)}
        params = {k: ref[k].step({k: params[k]}, {k: grads[k]})[k] for k in params}
    ft.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, optimizer=opt, progress=False, cache_features=False)
    state = ft.state()
    for name in ("weight", "bias"):
        np.testing.assert_allclose(state[f"head.out.{name}"], params[name], rtol=2e-5, atol=2e-6, err_msg=name)


class _Capture(tl.callbacks.Callback):
    def __init__(self):
        self.states = []

    def on_epoch_end(self, epoch, logs, model):
        self.states.append(model.state())


@check
def check_unfreeze_schedule_equals_the_same_stages_fit_by_hand(backend):
    """Stages inside one fit: a tensor frozen until stage k is bit-identical until then; unfrozen, it
    starts with zero moments, as the same stages fit one by one with ``ft.freeze`` between."""
    stages = [(0, tl.FreezePolicy.all()), (1, tl.FreezePolicy.up_to("bn1")), (2, tl.FreezePolicy.none())]
    opt = tl.optim.AdamW(lr=Cosine(peak_lr=1e-2, total_steps=18), weight_decay=0.05, no_decay="1d")
    ft = reference_finetune(backend, dropout=0.0)
    x, y = sample_data(ft, n=48)
    start, capture = ft.state(), _Capture()
    hist = _fit(ft, x, y, epochs=3, optimizer=opt, freeze=tl.UnfreezeSchedule(stages), callbacks=[capture])
    assert hist.info["cache_features"][0] == "used" and hist.info["cache_features"][1].startswith("refused")
    after = capture.states
    conv2 = [n for n in start if layer_of(n) in ("conv2", "bn2")]
    conv1 = [n for n in start if layer_of(n) in ("conv1", "bn1")]
    assert tl.changed_tensors(start, after[0], conv1 + conv2) == {}
    assert tl.changed_tensors(start, after[1], conv1) == {}
    assert set(conv2) <= set(tl.changed_tensors(start, after[1], conv2))
    assert set(conv1) - {n for n in conv1 if n.endswith("num_batches_tracked")} <= \
        set(tl.changed_tensors(after[1], after[2], conv1))
    by_hand = reference_finetune(backend, dropout=0.0)
    for epoch, policy in stages:
        by_hand.freeze(policy)
        _fit(by_hand, x, y, epochs=1, optimizer=opt)
    for name, value in ft.state().items():
        np.testing.assert_allclose(by_hand.state()[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@check
def check_early_stopping_restores_the_best_epoch_and_checkpoints_it(backend):
    ft = reference_finetune(backend, dropout=0.0)
    x, y = sample_data(ft, n=32)
    xv, yv = sample_data(ft, n=16, seed=9)
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "best.safetensors")
    capture = _Capture()
    stop = tl.callbacks.EarlyStopping(monitor="val_loss", patience=1, restore_best=True)
    keep = tl.callbacks.ModelCheckpoint(path, monitor="val_loss", save_best_only=True)
    hist = _fit(ft, x, y, epochs=12, optimizer=tl.optim.SGD(lr=0.5, momentum=0.9), validation_data=(xv, yv),
                callbacks=[capture, stop, keep])
    losses = hist["val_loss"]
    best = int(np.argmin(losses))
    assert stop.best_epoch == best and losses[best] == min(losses)
    assert tl.changed_tensors(capture.states[best], ft.state()) == {}, "the weights of the best epoch"
    if len(losses) < 12:
        assert hist.info["stopped_epoch"] == len(losses) - 1
    back = tl.load(path, model=tl.get_backend(backend).reference_model(seed=0).native) if ft.meta.get("arch") is None \
        else tl.load(path)
    assert tl.changed_tensors(capture.states[best], back.state()) == {}


@check
def check_bad_recipes_are_refused_before_training(backend):
    ft = reference_finetune(backend)
    x, y = sample_data(ft, n=16)
    snap = tl.snapshot(ft)
    other = tl.LayerGroups.from_names([["not.a.tensor"]])
    bad = [
        (lambda: _fit(ft, x, y, optimizer=tl.optim.SGD(lr=0.1, lr_mult=tl.LayerDecay(0.5, tl.LayerGroups([r"^nope"])))),
         "matches no parameter"),
        (lambda: _fit(ft, x, y, optimizer=tl.optim.SGD(lr=0.1, lr_mult=tl.LayerDecay(0.5, tl.LayerGroups(
            [r"conv", r"conv1|bn|head"])))), "two layer groups"),
        (lambda: _fit(ft, x, y, optimizer=tl.optim.SGD(lr=0.1, lr_mult=tl.LayerDecay(0.5, other))),
         "does not have"),
        (lambda: _fit(ft, x, y, callbacks=[tl.callbacks.EarlyStopping(monitor="val_los")]), "val_los"),
        (lambda: _fit(ft, x, y, freeze=tl.UnfreezeSchedule([(0, tl.FreezePolicy.up_to("conv9"))])), "conv9"),
    ]
    for run, message in bad:
        with raises(tl.TlcoreError, message):
            run()
    assert tl.changed_tensors(snap, ft.state()) == {}
