"""Conformance: the shared ``Model`` API behaves the same on every backend."""
from __future__ import annotations

import numpy as np
import pytest

import tlcore as tl

from . import REFERENCE_LAYERS, layer_of, reference_finetune, sample_data


def test_wrap_exposes_backend_native_layers_and_state(backend):
    m = tl.get_backend(backend).reference_model(seed=0)
    assert m.backend == backend
    assert tl.wrap(m.native).backend == backend, "the backend is inferred from the native type"
    assert m.layers == REFERENCE_LAYERS
    state = m.state()
    assert state and all(isinstance(v, np.ndarray) for v in state.values())
    assert all(layer_of(n) in REFERENCE_LAYERS for n in state), list(state)
    kinds = {t.name: t.kind for t in m.tensors}
    assert {layer_of(n) for n, k in kinds.items() if k == "bn_stat"} == {"bn1", "bn2"}
    assert set(m.trainable_mask()) == set(state)


def test_cuts_by_name_index_and_drop_last_agree(backend):
    m = tl.get_backend(backend).reference_model(seed=0)
    kept = ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2"]
    for cut in (tl.LayerCut(at="relu2"), tl.LayerCut(at=5), tl.LayerCut(drop_last=3)):
        assert tl.finetune(m, cut=cut).layers == kept
    assert tl.finetune(m).layers == REFERENCE_LAYERS


def test_head_is_sized_from_the_cut_and_named_after_the_spec(backend):
    ft = reference_finetune(backend)
    assert ft.head == "head"
    assert ft.layers[-5:] == ["head", "head.pool", "head.fc0", "head.act0", "head.drop0", "head.out"][-5:]
    x, _ = sample_data(ft, n=5)
    assert ft.predict(x).shape == (5, 3)


def test_predict_evaluate_and_history(backend):
    ft = reference_finetune(backend)
    x, y = sample_data(ft, n=40)
    xv, yv = sample_data(ft, n=20, seed=1)
    hist = ft.fit(x, y, epochs=2, batch_size=16, validation_data=(xv, yv), progress=False)
    assert isinstance(hist, tl.History) and hist.epochs == 2
    assert set(hist.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(np.isfinite(v) for vals in hist.history.values() for v in vals)
    out = ft.evaluate(xv, yv, batch_size=7)
    assert out["loss"] == pytest.approx(hist["val_loss"][-1], rel=1e-5)
    assert 0.0 <= out["accuracy"] <= 1.0
    np.testing.assert_allclose(ft.predict(x, batch_size=7), ft.predict(x, batch_size=64), rtol=1e-5, atol=1e-6)


def test_training_learns_a_separable_task(backend):
    ft = reference_finetune(backend, tl.FreezePolicy.none(), dropout=0.0)
    x, y = sample_data(ft, n=96)
    before = ft.evaluate(x, y)["loss"]
    ft.fit(x, y, epochs=15, batch_size=32, optimizer=tl.optim.Adam(lr=1e-2), progress=False)
    assert ft.evaluate(x, y)["loss"] < 0.8 * before


def test_summary_counts_agree_with_state_and_mask(backend):
    ft = reference_finetune(backend)
    s = ft.summary()
    state, mask = ft.state(), ft.trainable_mask()
    kinds = {t.name: t.kind for t in ft.tensors}
    params = [n for n, k in kinds.items() if k in ("param", "bn_param")]
    assert s.total_params == sum(state[n].size for n in params)
    assert s.trainable_params == sum(state[n].size for n in params if mask[n])
    assert s.trainable_params < s.total_params
    text = str(s)
    assert "frozen" in text and "conv1" in text and "Trainable params" in text


def test_binary_cross_entropy_and_mse_losses(backend):
    model = tl.get_backend(backend).reference_model(seed=0)
    x, y = sample_data(reference_finetune(backend), n=32)
    for loss, target in (("binary_cross_entropy", (y == 0).astype(np.float32)),
                         ("mse", x.reshape(32, -1)[:, 0])):
        ft = tl.finetune(model, cut=tl.LayerCut(at="relu2"), head=tl.Head.linear(1))
        hist = ft.fit(x, target, epochs=2, batch_size=16, loss=loss, progress=False)
        assert np.isfinite(hist["loss"]).all()
        assert ft.evaluate(x, target, loss=loss)["loss"] >= 0
