"""No silent acceptance, no state change on refusal (issue 16, section 4).

One table of bad inputs, run on every selected backend. Each row is a call a user could make; it must
raise the named error class with a one-line, non-empty message, and leave the model exactly as it was:
every tensor of ``state()`` bit-identical (RNG-kind tensors, i.e. Keras' and JAX's dropout RNG state,
included), the same trainable mask and policy. Controls prove the comparison can fail (a valid call
right after does change the state), that a refusal leaves no hidden state behind (a fit after refusals
equals a fit without them), and that numpy scalars are accepted wherever a number is.
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import tlcore as tl
from tlcore.testing import reference_finetune, sample_data

N = 16  # samples of the fixture data (two batches of 8: each fit is quick)


# ----------------------------------------------------------------------------------------- fixtures
@dataclass
class Kit:
    """A fine-tuned reference model (frozen base, MLP head with dropout) and data that fits it."""

    backend: str
    model: tl.Model
    x: Any
    y: np.ndarray
    #: a token model (dict inputs ``input_ids`` / ``attention_mask``) fine-tuned with a head
    tokens: Kit | None = None

    def fit(self, **kw: Any) -> tl.History:
        """``model.fit`` on the kit's data (``x=``/``y=`` override), one quick epoch unless told."""
        x, y = kw.pop("x", self.x), kw.pop("y", self.y)
        kw.setdefault("batch_size", 8)
        kw.setdefault("progress", False)
        return self.model.fit(x, y, **kw)

    def float_tensor(self) -> str:
        """A trainable float parameter (of the head)."""
        mask = self.model.trainable_mask()
        return next(k for k, v in self.model.state().items() if v.dtype.kind == "f" and mask[k] and v.ndim == 2)

    def int_tensor(self) -> str:
        """An integer tensor (PyTorch's BatchNorm counter, Keras' seed state, NNX's RNG count/key)."""
        return next(k for k, v in self.model.state().items() if v.dtype.kind in "iu")

    def with_value(self, name: str, value: Any, dtype: Any = None) -> dict[str, np.ndarray]:
        """``{name: an array of the tensor's shape filled with value}`` (in ``dtype``, default float64)."""
        shape = self.model.state()[name].shape
        return {name: np.full(shape, value, dtype=dtype or np.float64)}


def token_kit(backend: str) -> Kit:
    """The backend's reference token model with a mean-pooling head for 3 classes, trained once."""
    model = tl.finetune(tl.get_backend(backend).reference_model(0, "tokens"), head=tl.Head.linear(3, pool="mean"),
                        freeze=tl.FreezePolicy.none())
    rng = np.random.default_rng(0)
    mask = np.ones((N, 6), np.int64)
    mask[:, 4:] = 0
    x = {"input_ids": rng.integers(0, 10, (N, 6)), "attention_mask": mask}
    y = rng.integers(0, 3, N)
    model.fit(x, y, epochs=1, batch_size=8, progress=False)
    return Kit(backend, model, x, y)


@pytest.fixture(scope="module")
def kit(backend: str) -> Kit:
    model = reference_finetune(backend)
    x, y = sample_data(model, n=N)
    model.fit(x, y, epochs=1, batch_size=8, progress=False)  # optimizer state and RNGs exist, as in real use
    return Kit(backend, model, x, y, tokens=token_kit(backend))


def frozen_state(model: tl.Model) -> dict[str, Any]:
    """Everything a refusal must leave as it was: a copy of every tensor, the mask and the policy, and
    the random state a backend keeps outside ``state()`` (PyTorch's generators, ``_random_state``)."""
    return {"state": {k: np.array(v, copy=True) for k, v in model.state().items()},
            "random": {k: np.array(v, copy=True) for k, v in model._random_state().items()},
            "mask": model.trainable_mask(), "policy": model.policy}


def assert_same(model: tl.Model, before: dict[str, Any]) -> None:
    """``model`` is as ``before`` (:func:`frozen_state`) says: bit for bit, with the same mask and policy."""
    after = frozen_state(model)
    assert list(after["state"]) == list(before["state"]), "the model's tensors changed names"
    moved = [k for k, v in before["state"].items()
             if v.dtype != after["state"][k].dtype or v.tobytes() != after["state"][k].tobytes()]
    assert not moved, f"refused, yet these tensors changed: {moved}"
    assert list(after["random"]) == list(before["random"])
    assert all(np.array_equal(v, after["random"][k]) for k, v in before["random"].items()), "random state moved"
    assert after["mask"] == before["mask"]
    assert after["policy"] == before["policy"]


# ----------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Bad:
    """One bad input: ``call(kit)`` must raise ``error`` (a class or a tuple: it must be all of them)
    whose message matches ``match``."""

    id: str
    call: Callable[[Kit], Any]
    error: type | tuple[type, ...]
    match: str = ""


def _nan_at(x: np.ndarray, value: float) -> np.ndarray:
    x = x.copy()
    x.flat[7] = value
    return x


def _wider(x: np.ndarray) -> np.ndarray:
    """``x`` with its last axis doubled: a per-sample shape the model does not take (NCHW or NHWC)."""
    return np.concatenate([x, x], axis=-1)


def _second_sample_weight(kit: Kit, value: float) -> np.ndarray:
    w = np.ones(N)
    w[1] = value
    return w


class Monitors(tl.callbacks.Callback):
    monitors = ("val_accuracy",)


DE, OE, TE = tl.DataError, tl.OptimizerConfigError, TypeError
SE = tl.schedules.ScheduleError
CE = tl.callbacks.CallbackError
KE = tl.CheckpointError
FE = tl.FreezePolicyError

BAD: list[Bad] = [
    # -------------------------------------------------------------- fit: counts and seeds
    Bad("fit-epochs-0", lambda k: k.fit(epochs=0), DE, "epochs"),
    Bad("fit-epochs-negative", lambda k: k.fit(epochs=-1), DE, "epochs"),
    Bad("fit-epochs-float", lambda k: k.fit(epochs=1.5), DE, "epochs"),
    Bad("fit-epochs-str", lambda k: k.fit(epochs="2"), DE, "epochs"),
    Bad("fit-epochs-bool", lambda k: k.fit(epochs=True), DE, "epochs"),
    Bad("fit-batch_size-0", lambda k: k.fit(batch_size=0), DE, "batch_size"),
    Bad("fit-batch_size-float", lambda k: k.fit(batch_size=2.5), DE, "batch_size"),
    Bad("fit-batch_size-str", lambda k: k.fit(batch_size="8"), DE, "batch_size"),
    Bad("fit-steps_per_epoch-0", lambda k: k.fit(steps_per_epoch=0), DE, "steps_per_epoch"),
    Bad("fit-steps_per_epoch-float", lambda k: k.fit(steps_per_epoch=1.5), DE, "steps_per_epoch"),
    Bad("fit-seed-negative", lambda k: k.fit(seed=-1), DE, "seed"),
    Bad("fit-seed-float", lambda k: k.fit(seed=1.5), DE, "seed"),
    Bad("fit-seed-str", lambda k: k.fit(seed="x"), DE, "seed"),
    Bad("fit-seed-too-big", lambda k: k.fit(seed=2**32), DE, "seed"),
    Bad("fit-seed-bool", lambda k: k.fit(seed=True), DE, "seed"),
    Bad("fit-shuffle-str", lambda k: k.fit(shuffle="yes"), DE, "shuffle"),
    Bad("fit-progress-unknown", lambda k: k.fit(progress="loud"), DE, "progress"),
    # -------------------------------------------------------------- fit: loss, metrics, optimizer
    Bad("fit-loss-unknown", lambda k: k.fit(loss="crossentropy"), OE, "did you mean 'cross_entropy'"),
    Bad("fit-loss-number", lambda k: k.fit(loss=42), OE, "loss"),
    Bad("fit-metric-unknown", lambda k: k.fit(metrics=["acc"]), (tl.TlcoreError, ValueError), "acc"),
    Bad("fit-metric-number", lambda k: k.fit(metrics=[3]), (tl.TlcoreError, ValueError), "3"),
    Bad("fit-optimizer-str", lambda k: k.fit(optimizer="adam"), TE, "tl.optim"),
    Bad("fit-optimizer-class", lambda k: k.fit(optimizer=tl.optim.Adam), TE, "tl.optim"),
    Bad("optim-lr-negative", lambda k: k.fit(optimizer=tl.optim.SGD(lr=-0.1)), OE, "lr"),
    Bad("optim-lr-nan", lambda k: k.fit(optimizer=tl.optim.SGD(lr=float("nan"))), OE, "lr"),
    Bad("optim-lr-str", lambda k: k.fit(optimizer=tl.optim.Adam(lr="0.1")), OE, "lr"),
    Bad("optim-lr-bool", lambda k: k.fit(optimizer=tl.optim.Adam(lr=True)), OE, "lr"),
    Bad("optim-momentum-1", lambda k: k.fit(optimizer=tl.optim.SGD(lr=0.1, momentum=1.0)), OE, "momentum"),
    Bad("optim-momentum-negative", lambda k: k.fit(optimizer=tl.optim.SGD(lr=0.1, momentum=-0.5)), OE, "momentum"),
    Bad("optim-nesterov-no-momentum", lambda k: k.fit(optimizer=tl.optim.SGD(lr=0.1, nesterov=True)), OE, "nesterov"),
    Bad("optim-betas-one", lambda k: k.fit(optimizer=tl.optim.Adam(betas=(0.9,))), OE, "betas"),
    Bad("optim-betas-out-of-range", lambda k: k.fit(optimizer=tl.optim.Adam(betas=(0.9, 1.0))), OE, "betas"),
    Bad("optim-betas-number", lambda k: k.fit(optimizer=tl.optim.Adam(betas=0.9)), OE, "betas"),
    Bad("optim-eps-0", lambda k: k.fit(optimizer=tl.optim.Adam(eps=0.0)), OE, "eps"),
    Bad("optim-weight_decay-negative", lambda k: k.fit(optimizer=tl.optim.AdamW(weight_decay=-0.01)), OE,
        "weight_decay"),
    Bad("optim-rmsprop-alpha", lambda k: k.fit(optimizer=tl.optim.RMSprop(alpha=1.5)), OE, "alpha"),
    Bad("optim-no_decay-regex", lambda k: k.fit(optimizer=tl.optim.AdamW(no_decay="(")), OE, "no_decay"),
    Bad("optim-lr_mult-type", lambda k: k.fit(optimizer=tl.optim.AdamW(lr_mult=0.5)), OE, "lr_mult"),
    Bad("groups-decay-above-1", lambda k: tl.LayerDecay(1.5, tl.LayerGroups([r"^conv"])), OE, "decay"),
    Bad("groups-not-groups", lambda k: tl.Discriminative(lo=0.1, groups=[r"^conv"]), OE, "LayerGroups"),
    Bad("groups-regex-matches-nothing", lambda k: k.fit(optimizer=tl.optim.AdamW(
        lr_mult=tl.LayerDecay(0.5, tl.LayerGroups([r"^nothing_here", r"."])))), OE, "matches no parameter"),
    Bad("fit-clip-str", lambda k: k.fit(clip_grad_norm="1"), DE, "clip_grad_norm"),
    Bad("fit-clip-negative", lambda k: k.fit(clip_grad_norm=-1.0), DE, "clip_grad_norm"),
    Bad("fit-clip-nan", lambda k: k.fit(clip_grad_norm=float("nan")), DE, "clip_grad_norm"),
    Bad("fit-clip-bool", lambda k: k.fit(clip_grad_norm=True), DE, "clip_grad_norm"),
    Bad("fit-precision", lambda k: k.fit(precision="fp16"), OE, "precision"),
    Bad("fit-cache_features", lambda k: k.fit(cache_features="yes"), DE, "cache_features"),
    Bad("fit-freeze-str", lambda k: k.fit(freeze="all"), TE, "FreezePolicy"),
    Bad("fit-callbacks-object", lambda k: k.fit(callbacks=[object()]), CE, "Callback"),
    Bad("fit-callbacks-not-a-list", lambda k: k.fit(callbacks=5), CE, "callbacks"),
    Bad("fit-callback-monitors-val-without-validation", lambda k: k.fit(callbacks=[Monitors()]), CE, "val_"),
    Bad("fit-earlystopping-unknown-key",
        lambda k: k.fit(callbacks=[tl.callbacks.EarlyStopping(monitor="val_acc")], validation_data=(k.x, k.y)),
        CE, "val_acc"),
    # -------------------------------------------------------------- schedules and callbacks
    Bad("schedule-total-0", lambda k: k.fit(optimizer=tl.optim.SGD(lr=tl.schedules.Cosine(total_steps=0))), SE,
        "total_steps"),
    Bad("schedule-warmup-too-long",
        lambda k: k.fit(optimizer=tl.optim.SGD(lr=tl.schedules.Linear(total_steps=5, warmup_steps=5))), SE, "warmup"),
    Bad("schedule-float-steps", lambda k: tl.schedules.Cosine(total_steps=10.5), SE, "total_steps"),
    Bad("schedule-peak-nan", lambda k: tl.schedules.Cosine(peak_lr=float("nan")), SE, "peak_lr"),
    Bad("schedule-onecycle-pct", lambda k: tl.schedules.OneCycle(pct_start=1.5), SE, "pct_start"),
    Bad("schedule-multistep-order", lambda k: tl.schedules.MultiStep(0.1, milestones=(6, 3)), SE, "milestones"),
    Bad("schedule-warmup-0", lambda k: tl.schedules.Warmup(steps=0), SE, "steps"),
    Bad("callback-patience-negative", lambda k: tl.callbacks.EarlyStopping(patience=-1), CE, "patience"),
    Bad("callback-patience-float", lambda k: tl.callbacks.EarlyStopping(patience=1.5), CE, "patience"),
    Bad("callback-mode", lambda k: tl.callbacks.EarlyStopping(mode="best"), CE, "mode"),
    Bad("callback-min_delta-nan", lambda k: tl.callbacks.EarlyStopping(min_delta=float("nan")), CE, "min_delta"),
    Bad("callback-min_delta-str", lambda k: tl.callbacks.EarlyStopping(min_delta="0.1"), CE, "min_delta"),
    # -------------------------------------------------------------- fit: data
    Bad("data-length-mismatch", lambda k: k.fit(y=k.y[:-1]), DE, "different lengths"),
    Bad("data-labels-out-of-range", lambda k: k.fit(y=k.y + 3), DE, "out of range"),
    Bad("data-labels-negative", lambda k: k.fit(y=k.y - 1), DE, "out of range"),
    Bad("data-labels-float", lambda k: k.fit(y=k.y + 0.5), DE, "integer"),
    Bad("data-labels-str", lambda k: k.fit(y=np.array(["a"] * N)), DE, "y"),
    Bad("data-y-missing", lambda k: k.fit(y=None), DE, "targets"),
    Bad("data-nan-x", lambda k: k.fit(x=_nan_at(k.x, np.nan)), DE, "NaN"),
    Bad("data-inf-x", lambda k: k.fit(x=_nan_at(k.x, np.inf)), DE, "infinite"),
    Bad("data-complex-x", lambda k: k.fit(x=k.x.astype(np.complex64)), DE, "complex"),
    Bad("data-uint64-beyond-int64", lambda k: k.fit(x=np.full(k.x.shape, 2**63, np.uint64)), DE, "int64"),
    Bad("data-str-x", lambda k: k.fit(x=np.full(k.x.shape, "a")), DE, "numeric"),
    Bad("data-empty-x", lambda k: k.fit(x=k.x[:0], y=k.y[:0]), DE, "empty"),
    Bad("data-wrong-ndim", lambda k: k.fit(x=k.x[:, 0]), DE, "dimensions"),
    Bad("data-wrong-sample-shape", lambda k: k.fit(x=_wider(k.x)), DE, "shape"),
    Bad("data-nan-y-probabilities", lambda k: k.fit(y=np.full((N, 3), np.nan)), DE, "NaN"),
    Bad("data-sample_weight-negative", lambda k: k.fit(sample_weight=_second_sample_weight(k, -1.0)), DE, ">= 0"),
    Bad("data-sample_weight-nan", lambda k: k.fit(sample_weight=_second_sample_weight(k, np.nan)), DE, "finite"),
    Bad("data-sample_weight-length", lambda k: k.fit(sample_weight=np.ones(N - 1)), DE, "shape"),
    Bad("data-sample_weight-str", lambda k: k.fit(sample_weight="uniform"), DE, "sample_weight"),
    Bad("data-class_weight-negative", lambda k: k.fit(class_weight={0: -1.0}), OE, "class_weight"),
    Bad("data-class_weight-str-key", lambda k: k.fit(class_weight={"a": 1.0}), OE, "class_weight"),
    Bad("data-class_weight-unknown-class", lambda k: k.fit(class_weight={7: 1.0}), (tl.TlcoreError, ValueError),
        "class"),
    Bad("data-class_weight-str", lambda k: k.fit(class_weight="balanced"), OE, "class_weight"),
    Bad("data-class_weight-mse", lambda k: k.fit(loss="mse", y=np.zeros((N, 3), np.float32), class_weight={0: 1.0}),
        OE, "class_weight"),
    Bad("data-scale-str", lambda k: k.fit(x=tl.data.scale(k.x, "1/255")), DE, "scale factor"),
    Bad("data-scale-zero", lambda k: k.fit(x=tl.data.scale(k.x, 0.0)), DE, "scale factor"),
    Bad("data-labels-column", lambda k: k.fit(y=k.y.reshape(-1, 1)), DE, "y"),
    Bad("data-class_weight-too-few", lambda k: k.fit(class_weight=[1.0, 2.0]), (tl.TlcoreError, ValueError),
        "class_weight"),
    Bad("loss-label_smoothing", lambda k: k.fit(loss=tl.losses.CrossEntropy(label_smoothing=1.5)), OE,
        "label_smoothing"),
    Bad("loss-bce-on-class-labels", lambda k: k.fit(loss="binary_cross_entropy", y=k.y + 1), DE, "binary"),
    Bad("val-sample_weight-negative",
        lambda k: k.fit(validation_data=(k.x, k.y, _second_sample_weight(k, -2.0))), DE, ">= 0"),
    Bad("val-not-a-pair", lambda k: k.fit(validation_data=k.x), DE, "validation_data"),
    Bad("val-one-element", lambda k: k.fit(validation_data=(k.x,)), DE, "validation_data"),
    Bad("val-four-elements", lambda k: k.fit(validation_data=(k.x, k.y, None, None)), DE, "validation_data"),
    Bad("val-str", lambda k: k.fit(validation_data="val"), DE, "validation_data"),
    Bad("val-length-mismatch", lambda k: k.fit(validation_data=(k.x, k.y[:-1])), DE, "different lengths"),
    Bad("val-wrong-shape", lambda k: k.fit(validation_data=(_wider(k.x), k.y)), DE, "shape"),
    Bad("val-labels-out-of-range", lambda k: k.fit(validation_data=(k.x, k.y + 3)), DE, "out of range"),
    Bad("val-nan", lambda k: k.fit(validation_data=(_nan_at(k.x, np.nan), k.y)), DE, "NaN"),
    Bad("stream-bad-second-batch-structure",
        lambda k: k.fit(x=[(k.x[:8], k.y[:8]), (_wider(k.x[:8]), k.y[:8])], y=None), DE, "batch 1"),
    Bad("stream-with-y", lambda k: k.fit(x=[(k.x[:8], k.y[:8])], y=k.y), DE, "source of batches"),
    Bad("stream-empty", lambda k: k.fit(x=lambda: iter(()), y=None), DE, "no batch"),
    Bad("stream-five-parts", lambda k: k.fit(x=[(k.x[:8], k.y[:8], None, None, None)], y=None), DE, "parts"),
    # -------------------------------------------------------------- dict inputs (a token model)
    Bad("tokens-missing-input", lambda k: k.tokens.fit(x={"attention_mask": k.tokens.x["attention_mask"]}), DE,
        "input_ids"),
    Bad("tokens-unknown-key", lambda k: k.tokens.fit(x={**k.tokens.x, "token_type_ids": k.tokens.x["input_ids"]}),
        DE, "token_type_ids"),
    Bad("tokens-empty-dict", lambda k: k.tokens.fit(x={}), DE, "empty"),
    Bad("tokens-tuple-too-long", lambda k: k.tokens.fit(x=(k.tokens.x["input_ids"],) * 3), DE, "3"),
    Bad("tokens-length-mismatch",
        lambda k: k.tokens.fit(x={**k.tokens.x, "attention_mask": k.tokens.x["attention_mask"][:-1]}), DE,
        "different lengths"),
    Bad("tokens-complex-ids", lambda k: k.tokens.fit(x={**k.tokens.x, "input_ids": k.tokens.x["input_ids"] + 0j}),
        DE, "complex"),
    Bad("tokens-nan-mask",
        lambda k: k.tokens.fit(x={**k.tokens.x, "attention_mask": k.tokens.x["attention_mask"] * np.nan}), DE,
        "NaN"),
    Bad("tokens-predict-unknown-key", lambda k: k.tokens.model.predict({**k.tokens.x, "pixel_values": k.x}), DE,
        "pixel_values"),
    # -------------------------------------------------------------- freezing
    Bad("freeze-up_to-unknown", lambda k: k.model.freeze(tl.FreezePolicy.up_to("conv_1")), tl.LayerNotFoundError,
        "did you mean 'conv1'"),
    Bad("freeze-up_to-index", lambda k: k.model.freeze(tl.FreezePolicy.up_to(40)), tl.LayerNotFoundError,
        "out of range"),
    Bad("freeze-up_to-float", lambda k: k.model.freeze(tl.FreezePolicy.up_to(1.5)), FE, "up_to"),
    Bad("freeze-matching-nothing", lambda k: k.model.freeze(tl.FreezePolicy.matching(r"^does_not_exist")), FE,
        "freezes no tensor"),
    Bad("freeze-matching-bad-regex", lambda k: tl.FreezePolicy.matching("("), FE, "regex"),
    Bad("freeze-mode-unknown", lambda k: tl.FreezePolicy("some"), FE, "freeze mode"),
    Bad("freeze-bn-unknown", lambda k: tl.FreezePolicy.all(bn="eval"), FE, "bn"),
    Bad("freeze-str", lambda k: k.model.freeze("all"), TE, "FreezePolicy"),
    Bad("fit-freeze-policy-matches-nothing",
        lambda k: k.fit(freeze=tl.FreezePolicy.matching(r"^does_not_exist")), FE, "freezes no tensor"),
    Bad("unfreeze-schedule-start", lambda k: tl.UnfreezeSchedule([(1, tl.FreezePolicy.all())]), FE, "epoch 0"),
    Bad("unfreeze-schedule-bad-stage",
        lambda k: k.fit(epochs=2, freeze=tl.UnfreezeSchedule([(0, tl.FreezePolicy.all()),
                                                              (1, tl.FreezePolicy.up_to("nope"))])),
        tl.LayerNotFoundError, "nope"),
    Bad("recipe-fine_tune-epochs-0", lambda k: tl.recipes.fine_tune(k.model, k.x, k.y, epochs=0, progress=False),
        DE, "epochs"),
    Bad("recipe-fine_tune-base_lr", lambda k: tl.recipes.fine_tune(k.model, k.x, k.y, base_lr=-1.0, progress=False),
        OE, "base_lr"),
    Bad("recipe-fine_tune-bad-data", lambda k: tl.recipes.fine_tune(k.model, _nan_at(k.x, np.nan), k.y,
                                                                      progress=False), DE, "NaN"),
    # -------------------------------------------------------------- predict / evaluate / features
    Bad("predict-batch_size-0", lambda k: k.model.predict(k.x, batch_size=0), DE, "batch_size"),
    Bad("predict-batch_size-bool", lambda k: k.model.predict(k.x, batch_size=True), DE, "batch_size"),
    Bad("predict-nan", lambda k: k.model.predict(_nan_at(k.x, np.nan)), DE, "NaN"),
    Bad("predict-complex", lambda k: k.model.predict(k.x + 1j), DE, "complex"),
    Bad("predict-wrong-shape", lambda k: k.model.predict(_wider(k.x)), DE, "shape"),
    Bad("predict-none", lambda k: k.model.predict(None), DE, "x"),
    Bad("evaluate-length-mismatch", lambda k: k.model.evaluate(k.x, k.y[:-1]), DE, "different lengths"),
    Bad("evaluate-metric-unknown", lambda k: k.model.evaluate(k.x, k.y, metrics=["acc"]),
        (tl.TlcoreError, ValueError), "acc"),
    Bad("evaluate-loss-unknown", lambda k: k.model.evaluate(k.x, k.y, loss="xent"), OE, "loss"),
    Bad("evaluate-sample_weight-negative",
        lambda k: k.model.evaluate(k.x, k.y, sample_weight=_second_sample_weight(k, -1.0)), DE, ">= 0"),
    Bad("features-batch_size-0", lambda k: k.model.features(k.x, batch_size=0), DE, "batch_size"),
    Bad("features-complex", lambda k: k.model.features(k.x.astype(np.complex128)), DE, "complex"),
    Bad("summary-input_shape-str", lambda k: k.model.summary(input_shape="8,8,3"), DE, "input_shape"),
    # -------------------------------------------------------------- load_state
    Bad("load_state-nan", lambda k: k.model.load_state(k.with_value(k.float_tensor(), np.nan), strict=False), KE,
        "NaN"),
    Bad("load_state-inf", lambda k: k.model.load_state(k.with_value(k.float_tensor(), -np.inf), strict=False), KE,
        "inf"),
    Bad("load_state-overflows-float32", lambda k: k.model.load_state(k.with_value(k.float_tensor(), 1e40),
                                                                       strict=False), KE, "float32"),
    Bad("load_state-overflows-int",
        lambda k: k.model.load_state(k.with_value(k.int_tensor(), np.iinfo(k.model.state()[k.int_tensor()].dtype).max
                                                  + 1, np.uint64), strict=False), KE, "range"),
    Bad("load_state-negative-fraction-into-int",
        lambda k: k.model.load_state(k.with_value(k.int_tensor(), -1.5), strict=False), KE, "whole"),
    Bad("load_state-float-into-int", lambda k: k.model.load_state(k.with_value(k.int_tensor(), 1.5), strict=False),
        KE, "whole"),
    Bad("load_state-complex", lambda k: k.model.load_state(k.with_value(k.float_tensor(), 1 + 1j, np.complex64),
                                                             strict=False), KE, "complex"),
    Bad("load_state-str", lambda k: k.model.load_state(k.with_value(k.float_tensor(), "a", object), strict=False),
        KE, "numeric"),
    Bad("load_state-wrong-shape", lambda k: k.model.load_state({k.float_tensor(): np.zeros((1, 2, 3, 4, 5))},
                                                                 strict=False), KE, "shape"),
    Bad("load_state-unknown-name", lambda k: k.model.load_state({"no.such.tensor": np.zeros(1)}, strict=False), KE,
        "no.such.tensor"),
    Bad("load_state-missing-name-strict",
        lambda k: k.model.load_state({n: v for n, v in list(k.model.state().items())[1:]}), KE, "missing"),
    Bad("load_state-not-a-dict", lambda k: k.model.load_state([np.zeros(3)]), KE, "dict"),
    Bad("load_state-nan-among-good",
        lambda k: k.model.load_state({**{n: v + 1 for n, v in k.model.state().items() if v.dtype.kind == "f"},
                                      **k.with_value(k.float_tensor(), np.nan)}, strict=False), KE, "NaN"),
    # -------------------------------------------------------------- finetune, wrap, heads, zoo
    Bad("finetune-cut-unknown", lambda k: tl.finetune(k.model, cut=tl.LayerCut(at="conv3")), tl.LayerNotFoundError,
        "conv3"),
    Bad("finetune-cut-drop-everything", lambda k: tl.finetune(k.model, cut=tl.LayerCut(drop_last=99)), tl.CutError,
        "every layer"),
    Bad("finetune-cut-str", lambda k: tl.finetune(k.model, cut="conv1"), TE, "LayerCut"),
    Bad("finetune-head-str", lambda k: tl.finetune(k.model, cut=tl.LayerCut(at="relu2"), head="linear"),
        tl.UnsupportedModelError, "head"),
    Bad("finetune-input_shape-str", lambda k: tl.finetune(k.model, input_shape="8,8,3"), DE, "input_shape"),
    Bad("finetune-input_shape-zero", lambda k: tl.finetune(k.model, input_shape=(0, 8, 3)), DE, "input_shape"),
    Bad("finetune-input_shape-negative", lambda k: tl.finetune(k.model, input_shape=(8, -8, 3)), DE, "input_shape"),
    Bad("finetune-seed-negative", lambda k: tl.finetune(k.model, seed=-1), DE, "seed"),
    Bad("finetune-freeze-str", lambda k: tl.finetune(k.model, freeze="all"), TE, "FreezePolicy"),
    Bad("wrap-input_shape-str", lambda k: tl.wrap(k.model.native, backend=k.backend, input_shape="8"), DE,
        "input_shape"),
    Bad("wrap-unknown-backend", lambda k: tl.wrap(k.model.native, backend="pytorch"), tl.BackendNotFoundError,
        "pytorch"),
    Bad("wrap-not-a-model", lambda k: tl.wrap(object()), tl.UnsupportedModelError, "object"),
    Bad("head-linear-bool", lambda k: tl.Head.linear(True), (tl.TlcoreError, ValueError), "num_classes"),
    Bad("head-linear-0", lambda k: tl.Head.linear(0), (tl.TlcoreError, ValueError), "num_classes"),
    Bad("head-hidden-float", lambda k: tl.Head.mlp(hidden=(1.5,), num_classes=3), (tl.TlcoreError, ValueError),
        "hidden"),
    Bad("head-dropout-1", lambda k: tl.Head.mlp(num_classes=3, dropout=1.0), (tl.TlcoreError, ValueError), "dropout"),
    Bad("zoo-unknown", lambda k: tl.zoo.create("resnet19", backend=k.backend), tl.ZooError, "resnet18"),
    Bad("zoo-float-width", lambda k: tl.zoo.create("mlp", backend=k.backend, in_features=4, hidden=(1.5,)),
        (tl.TlcoreError, ValueError), "hidden"),
    Bad("zoo-num_classes-0", lambda k: tl.zoo.create("mlp", backend=k.backend, in_features=4, num_classes=0),
        (tl.TlcoreError, ValueError), "num_classes"),
    Bad("zoo-seed-negative", lambda k: tl.zoo.create("mlp", backend=k.backend, in_features=4, seed=-1), DE, "seed"),
    # -------------------------------------------------------------- data sets
    Bad("datasets-seed-negative", lambda k: tl.datasets.digits(seed=-1), DE, "seed"),
    Bad("datasets-test_fraction", lambda k: tl.datasets.digits(test_fraction=1.5), DE, "test_fraction"),
    Bad("datasets-unknown-class", lambda k: tl.datasets.digits(classes=(3, 11)), DE, "class"),
    Bad("datasets-few_shot-shots-0", lambda k: tl.datasets.few_shot(k.x, k.y, shots=0), DE, "shots"),
    Bad("datasets-few_shot-seed", lambda k: tl.datasets.few_shot(k.x, k.y, shots=1, seed=1.5), DE, "seed"),
]


def test_the_table_is_big_enough_and_ids_are_unique():
    assert len(BAD) >= 60
    assert len({b.id for b in BAD}) == len(BAD)


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_input_is_refused_and_changes_nothing(kit: Kit, bad: Bad):
    before, before_tokens = frozen_state(kit.model), frozen_state(kit.tokens.model)
    kinds = bad.error if isinstance(bad.error, tuple) else (bad.error,)
    with pytest.raises(Exception) as info:
        bad.call(kit)
    err = info.value
    assert all(isinstance(err, k) for k in kinds), \
        f"{type(err).__name__} ({type(err).__mro__}) is not {[k.__name__ for k in kinds]}: {err}"
    message = str(err)
    assert message.strip(), "empty message"
    assert "\n" not in message, f"the message is not one line: {message!r}"
    if bad.match:
        assert re.search(bad.match, message), f"{message!r} does not match {bad.match!r}"
    assert_same(kit.model, before)
    assert_same(kit.tokens.model, before_tokens)


# ----------------------------------------------------------------------------------------- controls
def test_the_state_comparison_sees_a_valid_call_change_weights_and_rng(kit: Kit):
    """Negative control: the same comparison fails after a valid fit: the head's weights move, and the
    dropout RNG state advances (on Keras and JAX it is in ``state()`` as ``rng`` tensors; PyTorch's
    generators are kept outside it, in ``_random_state()``)."""
    before = frozen_state(kit.model)
    rng_names = [t.name for t in kit.model.tensors if t.kind == "rng"]
    assert bool(rng_names) == (kit.backend != "torch"), "the head's dropout RNG state is in state() but on torch"
    assert bool(before["random"]) == (kit.backend == "torch")
    kit.fit(epochs=1)
    with pytest.raises(AssertionError, match="changed"):
        assert_same(kit.model, before)
    after = frozen_state(kit.model)
    rng_moved = [n for n in rng_names if not np.array_equal(before["state"][n], after["state"][n])]
    random_moved = [k for k, v in before["random"].items() if not np.array_equal(v, after["random"][k])]
    assert rng_moved or random_moved, "a valid fit advances the dropout RNG"


def test_refusals_leave_no_hidden_state(backend: str):
    """Refused calls (a bad seed, bad data, a bad load_state) in between change nothing that a later fit
    sees: the shuffling and dropout RNGs, the optimizer state and the step go on as without them.
    Control: one valid fit in between does change the outcome."""
    adam = tl.optim.Adam(lr=1e-2)

    def run(between: str) -> dict[str, np.ndarray]:
        m = reference_finetune(backend)
        x, y = sample_data(m, n=N)
        m.fit(x, y, epochs=1, batch_size=8, progress=False, optimizer=adam)
        if between == "refusals":
            name = next(k for k, v in m.state().items() if v.dtype.kind == "f" and m.trainable_mask()[k])
            for call in (lambda: m.fit(x, y, seed=-1, progress=False, optimizer=adam),
                         lambda: m.fit(x, y + 3, progress=False, optimizer=adam),
                         lambda: m.fit(x, y, batch_size=8, progress=False, optimizer=adam, validation_data=x),
                         lambda: m.fit(x, y, batch_size=8, progress=False, optimizer=adam, callbacks=5),
                         lambda: m.load_state({name: np.full(m.state()[name].shape, np.nan)}, strict=False)):
                with pytest.raises(tl.TlcoreError):
                    call()
        elif between == "a fit":
            m.fit(x, y, epochs=1, batch_size=8, progress=False, optimizer=adam)
        m.fit(x, y, epochs=1, batch_size=8, progress=False, optimizer=adam)
        return m.state()

    plain, refused, control = run("nothing"), run("refusals"), run("a fit")
    assert list(plain) == list(refused)
    assert [k for k in plain if not np.array_equal(plain[k], refused[k])] == []
    assert any(not np.array_equal(plain[k], control[k]) for k in plain), "control: a fit in between changes the result"


def test_numpy_scalars_are_accepted_and_train_as_python_numbers(kit: Kit):
    """``SGD(lr=np.float32(0.1))`` and numpy ints for epochs, batch size, seed, steps: the same spec and
    the same training as Python numbers."""
    assert tl.optim.SGD(lr=np.float32(0.1), momentum=np.float32(0.9)) == tl.optim.SGD(lr=0.1, momentum=0.9)
    assert tl.optim.Adam(lr=np.float64(1e-3), betas=(np.float32(0.9), np.float16(0.5))) == \
        tl.optim.Adam(lr=1e-3, betas=(0.9, 0.5))
    assert tl.schedules.Cosine(peak_lr=np.float32(0.1), total_steps=np.int64(10), warmup_steps=np.int32(2)) == \
        tl.schedules.Cosine(peak_lr=0.1, total_steps=10, warmup_steps=2)
    assert tl.callbacks.EarlyStopping(patience=np.int64(2), min_delta=np.float32(0.5)).patience == 2
    assert tl.LayerDecay(np.float32(0.5), tl.LayerGroups([r"."])).decay == 0.5

    start = kit.model.state()

    def train(numpy: bool) -> dict[str, np.ndarray]:
        kit.model.load_state(start)
        if numpy:
            kit.fit(optimizer=tl.optim.SGD(lr=np.float32(0.1), momentum=np.float32(0.9)), epochs=np.int64(2),
                    batch_size=np.int32(8), seed=np.int64(3), clip_grad_norm=np.float32(1.0), reset=True,
                    steps_per_epoch=np.int16(2), class_weight={np.int64(0): np.float32(2.0)},
                    sample_weight=np.ones(N, np.float32))
        else:
            kit.fit(optimizer=tl.optim.SGD(lr=0.1, momentum=0.9), epochs=2, batch_size=8, seed=3, clip_grad_norm=1.0,
                    reset=True, steps_per_epoch=2, class_weight={0: 2.0}, sample_weight=np.ones(N, np.float32))
        return kit.model.state()

    with_python, with_numpy = train(False), train(True)
    assert any(not np.array_equal(with_python[k], start[k]) for k in start), "training changed nothing"
    assert all(np.array_equal(with_python[k], with_numpy[k]) for k in start)


def test_numpy_scalars_are_accepted_across_the_api():
    """Every spec that takes a number takes numpy's, and equals the spec built from Python numbers."""
    i, f = np.int64, np.float32
    pairs = [
        (tl.Head.mlp(hidden=(i(4),), num_classes=i(3), dropout=f(0.25)), tl.Head.mlp(hidden=(4,), num_classes=3,
                                                                                     dropout=0.25)),
        (tl.FreezePolicy.up_to(i(2)), tl.FreezePolicy.up_to(2)),
        (tl.UnfreezeSchedule([(i(0), tl.FreezePolicy.all()), (i(2), tl.FreezePolicy.none())]),
         tl.UnfreezeSchedule([(0, tl.FreezePolicy.all()), (2, tl.FreezePolicy.none())])),
        (tl.losses.CrossEntropy(label_smoothing=f(0.1), class_weight={i(1): f(0.5)}),
         tl.losses.CrossEntropy(label_smoothing=0.1, class_weight={1: 0.5})),
        (tl.losses.Huber(delta=f(0.5)), tl.losses.Huber(delta=0.5)),
        (tl.losses.BinaryCrossEntropy(pos_weight=f(2.0)), tl.losses.BinaryCrossEntropy(pos_weight=2.0)),
        (tl.optim.RMSprop(lr=f(0.01), alpha=f(0.9), momentum=np.float64(0.5), centered=np.bool_(True)),
         tl.optim.RMSprop(lr=0.01, alpha=0.9, momentum=0.5, centered=True)),
        (tl.schedules.OneCycle(max_lr=f(0.1), total_steps=np.int32(20), pct_start=f(0.3)),
         tl.schedules.OneCycle(max_lr=0.1, total_steps=20, pct_start=0.3)),
        (tl.schedules.MultiStep(f(0.1), milestones=(i(3), np.uint8(6)), gamma=f(0.5)),
         tl.schedules.MultiStep(0.1, milestones=(3, 6), gamma=0.5)),
        (tl.Discriminative(lo=f(0.01), groups=tl.LayerGroups([r"."])), tl.Discriminative(lo=0.01, groups=tl.LayerGroups([r"."]))),
        (tl.data.scale(np.zeros(2), f(0.1)).factor, 0.1),
    ]
    for numpy_built, python_built in pairs:
        assert numpy_built == python_built, (numpy_built, python_built)
    assert tl.LayerCut(at=i(2)).resolve(["a", "b", "c"]) == "c"
    assert tl.datasets.few_shot(np.zeros((6, 2)), np.array([0, 0, 0, 1, 1, 1]), shots=i(2), seed=np.uint32(5))[0].shape \
        == (4, 2)


# ----------------------------------------------------------------------------------------- native flags
def test_native_trainable_flags_changed_behind_tlcore_are_detected_at_fit(kit: Kit):
    """A parameter made trainable or frozen with the framework's own switch (torch ``requires_grad``,
    Keras ``trainable``) is named at ``fit``, before anything trains. NNX has no such per-variable flag."""
    if kit.backend == "jax":
        pytest.skip("flax.nnx has no per-variable trainable flag to change behind tlcore's back")
    mask = kit.model.trainable_mask()
    frozen = next(n for n, t in mask.items() if not t and n.startswith("conv"))
    trainable = kit.float_tensor()
    for name in (frozen, trainable):
        before = frozen_state(kit.model)
        restore = _flip_native_flag(kit, name)
        try:
            with pytest.raises(tl.FreezePolicyError) as info:
                kit.fit()
            message = str(info.value)
            assert "\n" not in message and "model.freeze(tl.FreezePolicy" in message
            assert name.split(".")[0] in message, message
            assert_same(kit.model, before)
        finally:
            restore()
    kit.fit()  # back in line: trains again


def _flip_native_flag(kit: Kit, name: str) -> Callable[[], None]:
    """Flip the native trainable switch of tensor ``name``; return how to undo it."""
    if kit.backend == "torch":
        p = kit.model._params()[name]
        p.requires_grad_(not p.requires_grad)
        return lambda: p.requires_grad_(not p.requires_grad)
    layer = _keras_layer(kit.model.native, name.rpartition(".")[0])
    layer.trainable = not layer.trainable
    return lambda: setattr(layer, "trainable", not layer.trainable)


def _keras_layer(native: Any, path: str) -> Any:
    from tlcore_keras import cut

    return cut.get_path(native, path)


# ----------------------------------------------------------------------------------------- threads
def test_a_second_thread_calling_fit_gets_fit_in_progress_at_once(kit: Kit):
    """Thread 1 trains (held in its callback's ``on_train_begin``); thread 2's ``fit`` raises
    FitInProgressError at once, changing nothing; once released, thread 1's fit completes normally and a
    new fit works."""
    started, release = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    class Hold(tl.callbacks.Callback):
        def on_train_begin(self, model):
            started.set()
            assert release.wait(60), "the test never released the first fit"

    def first() -> None:
        try:
            result["history"] = kit.fit(epochs=2, callbacks=[Hold()])
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["error"] = e

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(60), "the first fit never started"
        before = frozen_state(kit.model)
        t0 = time.perf_counter()
        with pytest.raises(tl.FitInProgressError) as info:
            kit.fit()
        assert time.perf_counter() - t0 < 5, "the second fit waited instead of refusing at once"
        assert "\n" not in str(info.value) and "another thread" in str(info.value)
        assert isinstance(info.value, tl.TlcoreError)
        assert_same(kit.model, before)
    finally:
        release.set()
        thread.join(120)
    assert not thread.is_alive()
    assert "error" not in result, f"the first fit failed: {result.get('error')!r}"
    assert result["history"].epochs == 2
    assert kit.fit(epochs=1).epochs == 1


# ----------------------------------------------------------------------------------------- load_state values
@pytest.mark.parametrize("value, dtype, problem", [
    (np.float64(1e40), np.float32, "beyond the range of float32"),
    (np.float32(7e4), np.float16, "beyond the range of float16"),
    (np.nan, np.float32, "2 NaN and 0 inf"),
    (-np.inf, np.float64, "0 NaN and 2 inf"),
    (300, np.uint8, "out of the range of uint8"),
    (300, np.int8, "out of the range of int8"),
    (-1, np.uint32, "out of the range of uint32"),
    (2**63, np.int64, "out of the range of int64"),
    (1.5, np.int64, "not whole numbers"),
    (2, np.bool_, "out of the range of bool"),
    (1 + 2j, np.float32, "complex"),
    ("a", np.float32, "not numeric"),
    (255, np.uint8, None), (-128, np.int8, None), (3.0, np.int64, None), (1, np.bool_, None),
    (np.float32(3e38), np.float32, None), (np.int64(2**40), np.float32, None),
])
def test_load_state_values_that_do_not_fit_the_dtype(value, dtype, problem):
    """The rule :meth:`Model.load_state` applies per tensor (framework-free), with controls that fit."""
    like = np.zeros(2, dtype)
    given = np.array([value, value], dtype=object if isinstance(value, str) or value == 2**63 else None)
    if value == 2**63:
        given = given.astype(np.uint64)
    converted, why = tl.data.state_value(given, like)
    if problem is None:
        assert why == "" and converted.dtype == like.dtype and np.array_equal(converted, given.astype(dtype))
    else:
        assert converted is None and problem in why and "\n" not in why


def test_load_refuses_a_checkpoint_with_nan_before_building_anything_that_trains(backend: str, tmp_path):
    """``tl.load`` goes through ``load_state``: a NaN in the file is a CheckpointError naming the tensor;
    the same file without it loads (control)."""
    model = tl.zoo.create("mlp", backend=backend, in_features=4, num_classes=3)
    model.save(tmp_path / "good.safetensors")
    tensors, meta = tl.checkpoint.read(tmp_path / "good.safetensors")
    name = next(k for k, v in tensors.items() if v.dtype.kind == "f" and v.ndim == 2)
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    tl.checkpoint.write(tmp_path / "nan.safetensors", tensors,
                        {k: v for k, v in meta.items() if k not in ("format", "version", "sha256")})
    with pytest.raises(tl.CheckpointError, match=re.escape(name) + ".*NaN") as info:
        tl.load(tmp_path / "nan.safetensors")
    assert "\n" not in str(info.value)
    again = tl.load(tmp_path / "good.safetensors")
    assert all(np.array_equal(v, again.state()[k]) for k, v in model.state().items())


def test_torch_uint8_buffer_refuses_300_and_keeps_its_value():
    if "torch" not in tl.available_backends():
        pytest.skip("torch is not installed")
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    net[0].register_buffer("codes", torch.tensor([1, 2, 3], dtype=torch.uint8))
    model = tl.wrap(net)
    with pytest.raises(tl.CheckpointError, match=r"0\.codes has a value \(300\) out of the range of uint8"):
        model.load_state({"0.codes": np.array([300, 0, 0]), "0.weight": np.zeros((2, 4))}, strict=False)
    assert net[0].codes.tolist() == [1, 2, 3] and net[0].weight.abs().sum() > 0  # nothing was written
    model.load_state({"0.codes": np.array([255, 0, 7])}, strict=False)
    assert net[0].codes.tolist() == [255, 0, 7]


def test_keras_integer_input_refuses_fractional_token_ids(kit: Kit):
    """Keras casts a batch to its inputs' dtypes; floats that are not whole would be truncated silently.
    Whole floats (uint8 images arrive as float32) still go through (control)."""
    if kit.backend != "keras":
        pytest.skip("only Keras casts inputs to a declared integer dtype (torch and JAX refuse float ids themselves)")
    tokens = kit.tokens
    before = frozen_state(tokens.model)
    with pytest.raises(tl.DataError, match=r"x\['input_ids'\] holds values that are not whole numbers"):
        tokens.fit(x={**tokens.x, "input_ids": tokens.x["input_ids"] + 0.5})
    assert_same(tokens.model, before)
    whole = tokens.model.predict({**tokens.x, "input_ids": tokens.x["input_ids"].astype(np.float64)})
    assert np.array_equal(whole, tokens.model.predict(tokens.x))
