"""Conformance: bad input gets a named error before any weight is touched; the model is unchanged."""
from __future__ import annotations

import numpy as np
import pytest

import tlcore as tl

from . import reference_finetune, sample_data


@pytest.fixture
def model_and_data(backend):
    ft = reference_finetune(backend)
    x, y = sample_data(ft, n=32)
    return ft, x, y


def assert_unchanged(model, snap, mask):
    assert tl.changed_tensors(snap, model.state()) == {}
    assert model.trainable_mask() == mask


BAD_FITS = {
    "labels_out_of_range": (lambda x, y: (x, y + 3), "out of range"),
    "length_mismatch": (lambda x, y: (x, y[:-1]), "different lengths"),
    "nan_in_x": (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), y), "NaN"),
    "inf_in_x": (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 7, np.inf, x), y), "infinite"),
    "wrong_ndim": (lambda x, y: (x[:, 0], y), "dimensions"),
    "empty": (lambda x, y: (x[:0], y[:0]), "empty"),
    "float_labels": (lambda x, y: (x, y + 0.5), "integer"),
}


@pytest.mark.parametrize("case", list(BAD_FITS))
def test_bad_training_data_is_refused_before_training(model_and_data, case):
    ft, x, y = model_and_data
    snap, mask = tl.snapshot(ft), ft.trainable_mask()
    make, message = BAD_FITS[case]
    bx, by = make(x, y)
    with pytest.raises(tl.DataError, match=message):
        ft.fit(bx, by, epochs=1, progress=False)
    assert_unchanged(ft, snap, mask)


def test_unknown_layer_lists_valid_names_and_closest_match(model_and_data):
    ft, _, _ = model_and_data
    with pytest.raises(tl.LayerNotFoundError) as info:
        tl.finetune(ft, cut=tl.LayerCut(at="conv3"))
    msg = str(info.value)
    assert "'conv3'" in msg and "did you mean" in msg and "'relu1'" in msg


def test_bad_policies_are_refused_and_leave_the_model_unchanged(model_and_data):
    ft, _, _ = model_and_data
    snap, mask = tl.snapshot(ft), ft.trainable_mask()
    with pytest.raises(tl.LayerNotFoundError, match="did you mean 'conv1'"):
        ft.freeze(tl.FreezePolicy.up_to("conv_1"))
    with pytest.raises(tl.FreezePolicyError, match="freezes no tensor"):
        ft.freeze(tl.FreezePolicy.matching(r"^does_not_exist"))
    assert_unchanged(ft, snap, mask)


def test_bad_cut_and_shapes_in_load_state(model_and_data):
    ft, _, _ = model_and_data
    snap, mask = tl.snapshot(ft), ft.trainable_mask()
    with pytest.raises(tl.CutError):
        tl.finetune(ft, cut=tl.LayerCut(drop_last=99))
    name = next(iter(snap))
    with pytest.raises(tl.CheckpointError, match="shape"):
        ft.load_state({name: np.zeros((1, 2, 3, 4, 5), np.float32)}, strict=False)
    with pytest.raises(tl.CheckpointError, match="unexpected"):
        ft.load_state({"no.such.tensor": np.zeros(1)}, strict=False)
    assert_unchanged(ft, snap, mask)


@pytest.mark.parametrize("make", [
    lambda: tl.optim.SGD(lr=0.0), lambda: tl.optim.Adam(lr=-1e-3), lambda: tl.optim.AdamW(lr=1e-3, weight_decay=-0.1),
    lambda: tl.optim.RMSprop(lr=float("nan")), lambda: tl.optim.SGD(lr=0.1, nesterov=True)])
def test_bad_optimizer_values_are_refused_at_construction(make):
    with pytest.raises(tl.OptimizerConfigError):
        make()


def test_unknown_backend_lists_installed_ones():
    with pytest.raises(tl.BackendNotFoundError) as info:
        tl.wrap(object(), backend="mxnet")
    for name in tl.available_backends():
        assert repr(name) in str(info.value)


def test_unrecognised_native_object():
    with pytest.raises(tl.UnsupportedModelError, match="no backend recognises"):
        tl.wrap({"not": "a model"})


def test_unknown_loss_and_bad_fit_arguments(model_and_data):
    ft, x, y = model_and_data
    snap, mask = tl.snapshot(ft), ft.trainable_mask()
    with pytest.raises(tl.OptimizerConfigError, match="did you mean 'cross_entropy'"):
        ft.fit(x, y, loss="crossentropy", progress=False)
    with pytest.raises(tl.DataError, match="batch_size"):
        ft.fit(x, y, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="tl.optim"):
        ft.fit(x, y, optimizer="adam", progress=False)
    assert_unchanged(ft, snap, mask)
