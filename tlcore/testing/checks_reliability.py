"""Conformance: training that survives divergence and interruption. A guarded step whose loss or a
gradient is not finite changes nothing; ``fit`` stops there with ``tl.TrainingDiverged``.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np

import tlcore as tl
from tlcore.optim import TrainSpec

from . import reference_finetune, sample_data, tensor_kinds
from ._kit import check


def _without_rng(model: tl.Model) -> dict[str, np.ndarray]:
    """``state()`` less the random-number state (a refused step may advance it)."""
    kinds = tensor_kinds(model)
    return {k: v for k, v in model.state().items() if kinds.get(k) != "rng"}


def _trainable_everything(backend: str) -> tuple[tl.Model, np.ndarray, np.ndarray]:
    """The reference finetune with nothing frozen (BatchNorm statistics update while training)."""
    ft = reference_finetune(backend, freeze=tl.FreezePolicy.none(), dropout=0.0)
    x, y = sample_data(ft, n=16)
    ft.build(x[:2])
    return ft, x, y


@check(cases={"loss_overflows": {"bad": "loss"}, "inf_input": {"bad": "input"}})
def check_guarded_step_that_goes_nonfinite_changes_nothing(backend, bad):
    """Trainer contract (``TrainSpec.guard``): a step whose loss (a squared error that overflows
    float32) or gradients (an inf input: NaN gradients; fused kernels may keep the loss finite) are not
    finite leaves the weights, BatchNorm statistics and optimizer state as they were and sets
    ``nonfinite`` (``"loss"``, or a tensor's name); later steps change nothing until ``reset``.
    Negative control: the inf input unguarded writes NaN into the weights."""
    ft, x, y = _trainable_everything(backend)
    targets = np.random.default_rng(1).normal(size=(len(y), 3)).astype(np.float32)
    xb, yb = x[:8].copy(), targets[:8].copy()
    if bad == "loss":
        yb[1] = 3e30
    else:
        xb[0, ...] = np.inf
    spec = TrainSpec(tl.optim.Adam(lr=1e-2), tl.losses.MSE(), seed=0)
    trainer = ft._make_trainer(spec)
    trainer.reset(0)
    before = _without_rng(ft)
    trainer.step(x[:8], targets[:8])
    trainer.finish()
    after_good = _without_rng(ft)
    assert tl.changed_tensors(before, after_good), "a finite step trains"
    assert trainer.nonfinite is None
    opt_state = trainer.export_state()
    trainer.step(xb, yb)
    trainer.finish()
    if bad == "loss":
        assert trainer.nonfinite == "loss", f"nonfinite names the loss, got {trainer.nonfinite!r}"
    else:
        assert trainer.nonfinite in ["loss", *opt_state["steps"]], f"nonfinite names a tensor: {trainer.nonfinite!r}"
    assert tl.changed_tensors(after_good, _without_rng(ft)) == {}, "a non-finite step changes nothing"
    _same_optimizer_state(opt_state, trainer.export_state())
    trainer.step(x[8:16], targets[8:16])
    trainer.finish()
    assert tl.changed_tensors(after_good, _without_rng(ft)) == {}, "after a non-finite step, nothing trains"
    trainer.reset(0)
    assert trainer.nonfinite is None, "reset clears the flag"
    trainer.step(x[8:16], targets[8:16])
    trainer.finish()
    assert tl.changed_tensors(after_good, _without_rng(ft)), "after reset, steps train again"
    if bad == "input":
        unguarded = ft._make_trainer(replace(spec, guard=False))
        unguarded.reset(0)
        unguarded.step(xb, yb)
        unguarded.finish()
        assert unguarded.nonfinite is None
        assert any(not np.isfinite(v).all() for v in ft.state().values()), "negative control: unguarded, NaN goes in"


def _same_optimizer_state(a: dict, b: dict) -> None:
    assert a["steps"] == b["steps"], "optimizer step counts unchanged"
    for name, slots in a["slots"].items():
        for k, v in slots.items():
            np.testing.assert_array_equal(v, b["slots"][name][k], err_msg=f"optimizer state {k} of {name}")


def _diverging_data(ft: tl.Model, bad_batch: int, batch_size: int = 8, n: int = 32):
    """Regression data whose batch ``bad_batch`` (unshuffled) holds a target so large that the
    squared error overflows float32: the loss of that step is inf."""
    x, _ = sample_data(ft, n=n)
    y = np.random.default_rng(1).normal(size=(n, 3)).astype(np.float32)
    y[bad_batch * batch_size + 1] = 3e30
    return x, y


@check(cases={"raise": {"mode": "raise"}, "warn": {"mode": "warn"}})
def check_fit_stops_at_the_first_nonfinite_step_with_the_last_finite_weights(backend, mode):
    """``fit(on_nonfinite=...)``: ``"raise"`` stops with ``tl.TrainingDiverged`` (epoch, step, the
    first non-finite tensor), ``"warn"`` with a warning; either way the model equals a run of only
    the finite steps. Negative control: ``"ignore"`` trains the overflow into the weights."""
    kw = dict(epochs=2, batch_size=8, shuffle=False, loss="mse", optimizer=tl.optim.SGD(lr=1e-3), progress=False,
              seed=3)
    ft, _, _ = _trainable_everything(backend)
    x, y = _diverging_data(ft, bad_batch=2)
    start = ft.state()
    if mode == "raise":
        try:
            ft.fit(x, y, **kw)
        except tl.TrainingDiverged as e:
            assert (e.epoch, e.step, e.tensor) == (0, 2, "loss"), (e.epoch, e.step, e.tensor)
            assert "\n" not in str(e) and "epoch 0, step 2" in str(e)
        else:
            raise AssertionError("fit trained on after a non-finite loss")
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hist = ft.fit(x, y, on_nonfinite="warn", **kw)
        assert any("diverged" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert hist.info["steps"] == 2 and hist.info["diverged"] == {"epoch": 0, "step": 2, "tensor": "loss"}
    finite = reference_finetune(backend, freeze=tl.FreezePolicy.none(), dropout=0.0)
    finite.load_state(start)
    finite.fit(x[:16], y[:16], **{**kw, "epochs": 1})
    assert tl.changed_tensors(finite.state(), ft.state()) == {}, "the model keeps the last finite step's weights"

    ignored = reference_finetune(backend, freeze=tl.FreezePolicy.none(), dropout=0.0)
    ignored.load_state(start)
    hist = ignored.fit(x, y, on_nonfinite="ignore", **kw)
    assert any(not np.isfinite(v).all() for v in ignored.state().values()), "negative control: 'ignore' trains on"
    assert hist.info["steps"] == 8 and "diverged" not in hist.info, hist.info  # every step, NaN metrics allowed


class _Crash(tl.callbacks.Callback):
    """Raises at the end of epoch ``at``, as a preempted job dies (the last checkpoint stays)."""

    def __init__(self, at: int):
        self.at = at

    def on_epoch_end(self, epoch, logs, model):
        if epoch == self.at:
            raise RuntimeError("preempted")


def _resumable_run(backend: str) -> tuple[dict, tl.Model, np.ndarray, np.ndarray]:
    """A recipe that touches every piece of training state: AdamW with a cosine schedule, staged
    unfreezing (a cached head-only stage, then BatchNorm layers that train), dropout."""
    stages = [(0, tl.FreezePolicy.all()), (1, tl.FreezePolicy.up_to("bn1")), (2, tl.FreezePolicy.none())]
    opt = tl.optim.AdamW(lr=tl.schedules.Cosine(peak_lr=1e-2, total_steps=18), weight_decay=0.05)
    kw = dict(epochs=3, batch_size=8, optimizer=opt, freeze=tl.UnfreezeSchedule(stages), progress=False, seed=4,
              checkpoint_every=5)
    ft = reference_finetune(backend, dropout=0.2)
    x, y = sample_data(ft, n=48)
    return kw, ft, x, y


@check(cases={"in_cached_stage": {"crash_at": 0, "stream": False}, "in_unfrozen_stage": {"crash_at": 1, "stream": False},
              "from_a_generator": {"crash_at": 1, "stream": True}})
def check_resumed_run_equals_the_uninterrupted_one(backend, crash_at, stream):
    """``fit(checkpoint_dir=...)``, a crash, ``tl.resume`` and the same fit: weights, BatchNorm
    statistics, History and rates bit-identical to the run never interrupted (6 steps per epoch, a
    checkpoint every 5: the crash leaves one from the middle of an epoch). From a generator function
    (the same batches every epoch), the resumed epoch skips the batches done."""
    import tempfile

    kw, ft, x, y = _resumable_run(backend)
    if stream:
        xs, ys = x, y
        x, y = (lambda: ((xs[i:i + 8], ys[i:i + 8]) for i in range(0, len(xs), 8))), None
    native = lambda: tl.get_backend(backend).reference_model(0).native  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        whole = ft.fit(x, y, checkpoint_dir=f"{tmp}/a", **kw)
        _, crashed, _, _ = _resumable_run(backend)
        try:
            crashed.fit(x, y, checkpoint_dir=f"{tmp}/b", callbacks=[_Crash(crash_at)], **kw)
        except RuntimeError:
            pass
        else:
            raise AssertionError("the crash callback did not stop the fit")
        resumed = tl.resume(f"{tmp}/b", model=native())
        point = resumed._resume_point
        assert (point.epoch, point.batch, point.step) == ((0, 5, 5) if crash_at == 0 else (1, 4, 10))
        assert tl.changed_tensors(ft.state(), resumed.state()), "negative control: the saved state is mid-run"
        again = resumed.fit(x, y, checkpoint_dir=f"{tmp}/b", **kw)
        assert tl.changed_tensors(ft.state(), resumed.state()) == {}, "resumed == uninterrupted, bit for bit"
        assert again.history == whole.history and again.info["lr_steps"] == whole.info["lr_steps"]
        assert again.info["steps"] == whole.info["steps"] == 18
        done = tl.resume(f"{tmp}/b", model=native())
        kw.pop("checkpoint_every")
        assert done.fit(x, y, **kw).info["steps"] == 18, "a finished run resumed trains nothing more"
        assert tl.changed_tensors(ft.state(), done.state()) == {}


@check
def check_resume_refuses_other_data_optimizer_or_recipe(backend):
    """The fingerprints: each difference is named and refused before anything changes; resume='force'
    continues anyway; a fresh model will not overwrite another run's state unless resume=False."""
    import tempfile

    kw, ft, x, y = _resumable_run(backend)
    native = lambda: tl.get_backend(backend).reference_model(0).native  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        ft.fit(x, y, checkpoint_dir=tmp, **{**kw, "epochs": 1})
        resumed = tl.resume(tmp, model=native())
        before = resumed.state()
        other = {"data": dict(x=x[::-1].copy()), "optimizer": dict(optimizer=tl.optim.AdamW(lr=1e-3)),
                 "recipe": dict(freeze=tl.FreezePolicy.all())}
        for what, change in other.items():
            args = {"x": x, **kw, **change}
            try:
                resumed.fit(args.pop("x"), y, checkpoint_dir=tmp, **args)
            except tl.CheckpointError as e:
                assert f"another {what}" in str(e) and "\n" not in str(e), e
            else:
                raise AssertionError(f"a resumed fit with another {what} was not refused")
            assert tl.changed_tensors(before, resumed.state()) == {}
        hist = resumed.fit(x, y, checkpoint_dir=tmp, resume="force", **{**kw, "epochs": 2,
                                                                         "optimizer": tl.optim.SGD(lr=1e-3)})
        assert hist.epochs == 2 and hist.info["steps"] == 12, "forced: continued from epoch 1"
        fresh = reference_finetune(backend, dropout=0.2)
        try:
            fresh.fit(x, y, checkpoint_dir=tmp, **kw)
        except tl.CheckpointError as e:
            assert "tl.resume" in str(e)
        else:
            raise AssertionError("a new run silently overwrote another run's training state")
        assert fresh.fit(x, y, checkpoint_dir=tmp, resume=False, **{**kw, "epochs": 1}).info["steps"] == 6


@check
def check_ctrl_c_stops_at_a_step_boundary(backend):
    """A real SIGINT while training (BatchNorm statistics updating, so a half-done step would show):
    fit raises KeyboardInterrupt and the model equals a run of exactly the steps it completed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        raise AssertionError("this check sends SIGINT: run it in the main thread")
    ft, _, _ = _trainable_everything(backend)
    x, y = sample_data(ft, n=64)
    start = ft.state()
    kw = dict(batch_size=8, shuffle=False, optimizer=tl.optim.Adam(lr=1e-3), progress=False, seed=0)
    timer = threading.Timer(0.05, signal.raise_signal, (signal.SIGINT,))

    class CtrlCSoon(tl.callbacks.Callback):  # once training runs (a slow machine's first steps may take seconds)
        def on_epoch_end(self, epoch, logs, model):
            if epoch == 0:
                timer.start()

    try:
        ft.fit(x, y, epochs=10_000, callbacks=[CtrlCSoon()], **kw)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("fit did not stop at Ctrl-C")
    finally:
        timer.cancel()
    steps = ft._run.step
    assert 1 <= steps < 10_000 * 8, steps
    order = np.arange(steps * 8) % len(x)  # the batches it trained, in order (unshuffled)

    def run_of(k: int) -> dict:
        again = reference_finetune(backend, freeze=tl.FreezePolicy.none(), dropout=0.0)
        again.load_state(start)
        again.fit(x[order[:k * 8]], y[order[:k * 8]], epochs=1, **kw)
        return again.state()

    assert tl.changed_tensors(run_of(steps), ft.state()) == {}, f"the model is the state after step {steps}"
    assert tl.changed_tensors(run_of(steps - 1) if steps > 1 else start, ft.state()), "negative control"
