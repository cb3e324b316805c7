"""Conformance: bad input gets a named error before any weight is touched; the model is unchanged."""
from __future__ import annotations

import re
from contextlib import contextmanager

import numpy as np

import tlcore as tl

from . import reference_finetune, sample_data
from ._kit import check


def model_and_data(backend):
    ft = reference_finetune(backend)
    x, y = sample_data(ft, n=32)
    return ft, x, y


@contextmanager
def raises(kind: type, match: str = ""):
    """Like ``pytest.raises`` (the kit does not need pytest): the block must raise ``kind`` with a
    message matching ``match``."""
    try:
        yield
    except kind as e:
        assert re.search(match, str(e)), f"{type(e).__name__} message {str(e)!r} does not match {match!r}"
    else:
        raise AssertionError(f"{kind.__name__} was not raised")


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


@check(cases={case: {"case": case} for case in BAD_FITS})
def check_bad_training_data_is_refused_before_training(backend, case):
    ft, x, y = model_and_data(backend)
    snap, mask = tl.snapshot(ft), ft.trainable_mask()
    make, message = BAD_FITS[case]
    bx, by = make(x, y)
    with raises(tl.DataError, message):
        ft.fit(bx, by, epochs=1, progress=False)
    assert_unchanged(ft, snap, mask)


@check
def check_unknown_layer_lists_valid_names_and_closest_match(backend):
    ft, _, _ = model_and_data(backend)
    with raises(tl.LayerNotFoundError, r"'conv3'.*did you mean.*'relu1'"):
        tl.finetune(ft, cut=tl.LayerCut(at="conv3"))
    with raises(tl.LayerNotFoundError, r"integers count the .* top-level layers"):
        tl.finetune(ft, cut=tl.LayerCut(at=40))


@check
def check_bad_policies_are_refused_and_leave_the_model_unchanged(backend):
    ft, _, _ = model_and_data(backend)
    snap, mask = tl.snapshot(ft), ft.trainable_mask()
    with raises(tl.LayerNotFoundError, "did you mean 'conv1'"):
        ft.freeze(tl.FreezePolicy.up_to("conv_1"))
    with raises(tl.FreezePolicyError, "freezes no tensor"):
        ft.freeze(tl.FreezePolicy.matching(r"^does_not_exist"))
    assert_unchanged(ft, snap, mask)


@check
def check_bad_cut_and_shapes_in_load_state(backend):
    ft, _, _ = model_and_data(backend)
    snap, mask = tl.snapshot(ft), ft.trainable_mask()
    with raises(tl.CutError, "would drop every layer"):
        tl.finetune(ft, cut=tl.LayerCut(drop_last=99))
    name = next(iter(snap))
    with raises(tl.CheckpointError, "shape"):
        ft.load_state({name: np.zeros((1, 2, 3, 4, 5), np.float32)}, strict=False)
    with raises(tl.CheckpointError, "unexpected"):
        ft.load_state({"no.such.tensor": np.zeros(1)}, strict=False)
    assert_unchanged(ft, snap, mask)


@check
def check_unknown_loss_and_bad_fit_arguments(backend):
    ft, x, y = model_and_data(backend)
    snap, mask = tl.snapshot(ft), ft.trainable_mask()
    with raises(tl.OptimizerConfigError, "did you mean 'cross_entropy'"):
        ft.fit(x, y, loss="crossentropy", progress=False)
    with raises(tl.DataError, "batch_size"):
        ft.fit(x, y, batch_size=0, progress=False)
    for seed in (-1, 1.5, "x", 2**32):
        with raises(tl.DataError, "seed"):
            ft.fit(x, y, seed=seed, progress=False)
    with raises(TypeError, "tl.optim"):
        ft.fit(x, y, optimizer="adam", progress=False)
    assert_unchanged(ft, snap, mask)
