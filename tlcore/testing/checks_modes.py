"""Conformance: layers that switch between training and inference themselves (a BatchNorm + ReLU
layer reading the training flag, as timm's ``BatchNormAct2d``) inside a hand-written model (the
``"custom"`` reference, not a sequential container), cut in the middle.

Predicting never changes state and does not depend on the batch; frozen BatchNorm never moves in
``fit``; with ``FreezePolicy.none()`` the same statistics do move (the negative control).
"""
from __future__ import annotations

import numpy as np

import tlcore as tl

from . import layer_of, sample_data, tensor_kinds
from ._kit import check

CUT = "bnact2"


def custom_finetune(backend: str, freeze: tl.FreezePolicy) -> tl.Model:
    model = tl.get_backend(backend).reference_model(seed=0, variant="custom")
    assert model.layers[:4] == ["conv1", "bnact1", "conv2", "bnact2"], model.layers
    return tl.finetune(model, cut=tl.LayerCut(at=CUT), head=tl.Head.linear(3), freeze=freeze)


def bn_stats(model: tl.Model) -> list[str]:
    stats = [n for n, k in tensor_kinds(model).items() if k == "bn_stat"]
    assert {layer_of(n) for n in stats} == {"bnact1", "bnact2"}, stats
    return stats


@check
def check_custom_model_predict_never_changes_state(backend):
    whole = tl.get_backend(backend).reference_model(seed=0, variant="custom")
    for model in (whole, custom_finetune(backend, tl.FreezePolicy.all())):
        x, y = sample_data(model, n=12)
        snap = tl.snapshot(model)
        model.predict(x)
        model.predict(x[:1])
        model.evaluate(x, y % 3)
        assert tl.changed_tensors(snap, model.state()) == {}


@check
def check_custom_model_predict_is_batch_independent(backend):
    ft = custom_finetune(backend, tl.FreezePolicy.all())
    x, _ = sample_data(ft, n=12)
    full = ft.predict(x)
    for n in (1, 2, 5):
        np.testing.assert_allclose(ft.predict(x[:n]), full[:n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ft.predict(x, batch_size=5), full, rtol=1e-5, atol=1e-6)


@check
def check_custom_model_frozen_batchnorm_never_moves_in_fit(backend):
    ft = custom_finetune(backend, tl.FreezePolicy.all())
    x, y = sample_data(ft, n=32)
    snap = tl.snapshot(ft)
    ft.fit(x, y, epochs=2, batch_size=8, optimizer=tl.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-2),
           progress=False, cache_features=False)
    checked = tl.assert_frozen(snap, ft)
    assert set(bn_stats(ft)) <= set(checked)
    assert "head.out.weight" in tl.changed_tensors(snap, ft.state())


@check
def check_custom_model_policy_none_moves_batchnorm(backend):
    ft = custom_finetune(backend, tl.FreezePolicy.none())
    x, y = sample_data(ft, n=32)
    snap = tl.snapshot(ft)
    ft.fit(x, y, epochs=1, batch_size=8, optimizer=tl.optim.SGD(lr=0.05), progress=False)
    changed = tl.changed_tensors(snap, ft.state())
    assert [n for n in bn_stats(ft) if n not in changed] == []
