"""JAX: the non-finite step guard (``TrainSpec.guard``) inside the compiled step. A step whose loss or
a gradient is not finite changes nothing and names what was not finite (``trainer.nonfinite``); the
flag is sticky on the device, so the steps the epoch pipelines after the refused one change nothing
either; under float16 an overflowing gradient is the loss scale's business; and an epoch interrupted
from ``on_step`` leaves the model as the steps dispatched so far left it."""
from __future__ import annotations

import numpy as np
import pytest

import tlcore as tl
from tlcore.losses import MSE
from tlcore.optim import TrainSpec
from tlcore.testing import reference_finetune, sample_data

pytest.importorskip("flax", reason="the JAX backend (jax, flax, optax) is not installed")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tlcore_jax.layers import NamedSequential  # noqa: E402
from tlcore_jax.train import JaxTrainer, LossScale  # noqa: E402

BATCH = 8


# ---------------------------------------------------------------- a parameter with a chosen gradient
def _scaled_by(x, p, boost):
    return x * p


def _scaled_by_fwd(x, p, boost):
    return x * p, (x, p)


def _scaled_by_bwd(boost, res, g):
    """``x``'s gradient is the true one; ``p``'s is ``inf`` (``boost=None``) or ``boost * sum|g|``."""
    x, p = res
    if boost is None:
        return g * p, jnp.full_like(p, jnp.inf)
    return g * p, (jnp.abs(g).sum() * jnp.asarray(boost, g.dtype)).astype(p.dtype)


scaled_by = jax.custom_vjp(_scaled_by, nondiff_argnums=(2,))
scaled_by.defvjp(_scaled_by_fwd, _scaled_by_bwd)


class Spike(nnx.Module):
    """``x * p`` whose gradient for ``p`` is made by :func:`_scaled_by_bwd` (the loss stays finite)."""

    def __init__(self, boost: float | None = None):
        self.p = nnx.Param(jnp.ones((), jnp.float32))
        self.boost = boost

    def __call__(self, x):
        return scaled_by(x, self.p[...], self.boost)


def spiky_model(boost: float | None = None) -> tl.Model:
    rngs = nnx.Rngs(0)
    return tl.wrap(NamedSequential(d1=nnx.Linear(4, 5, rngs=rngs), s1=Spike(boost), d2=nnx.Linear(5, 3, rngs=rngs),
                                   s2=Spike(boost)))


def spiky_data(n: int = BATCH):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n)


def started(model: tl.Model, spec: TrainSpec) -> JaxTrainer:
    trainer = model._make_trainer(spec)
    trainer.reset(0)
    return trainer


# ---------------------------------------------------------------- data whose loss overflows
def everything_trains(seed: int = 0) -> tl.Model:
    ft = reference_finetune("jax", freeze=tl.FreezePolicy.none(), dropout=0.25, seed=seed)
    ft.build(sample_data(ft, n=2)[0])
    return ft


def diverging(ft: tl.Model, bad_batch: int, n: int = 48):
    """Regression targets whose batch ``bad_batch`` holds one so large that the squared error is inf."""
    x, _ = sample_data(ft, n=n)
    y = np.random.default_rng(1).normal(size=(n, 3)).astype(np.float32)
    y[bad_batch * BATCH + 1] = 3e30
    return x, y


def batches(n: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]


SPEC = TrainSpec(tl.optim.Adam(lr=1e-2), MSE())


def trained_on(start: dict, x, y, steps: list, spec: TrainSpec = SPEC) -> tuple[dict, dict]:
    """State and optimizer state of a fresh model from ``start`` after an epoch of ``steps``."""
    other = everything_trains()
    other.load_state(start)
    trainer = started(other, spec)
    trainer.epoch(x, y, None, steps, lrs=[1e-2] * len(steps))
    trainer.finish()
    return other.state(), trainer.export_state()


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["steps"] == b["steps"]
    for name, slots in a["slots"].items():
        for k, v in slots.items():
            np.testing.assert_array_equal(v, b["slots"][name][k], err_msg=f"{k} of {name}")


# ---------------------------------------------------------------- tests
def test_the_first_parameter_whose_gradient_is_not_finite_is_named_and_nothing_changes():
    m = spiky_model()
    x, y = spiky_data()
    before = m.state()
    trainer = started(m, TrainSpec(tl.optim.SGD(lr=0.1)))
    assert trainer.names.index("s1.p") < trainer.names.index("s2.p")
    out = trainer.step(x, y)
    trainer.finish()
    assert np.isfinite(out).all(), "the loss is finite: only the gradients of s1.p and s2.p are not"
    assert trainer.nonfinite == "s1.p", "the first of the two (in the trainer's order) is named, synchronously"
    assert tl.changed_tensors(before, m.state()) == {}
    assert set(trainer.export_state()["steps"].values()) == {0} and trainer.updates == 0
    trainer.reset(0)
    assert trainer.nonfinite is None

    unguarded = started(m, TrainSpec(tl.optim.SGD(lr=0.1), guard=False))
    unguarded.step(x, y)
    unguarded.finish()
    assert unguarded.nonfinite is None
    state = m.state()
    assert not np.isfinite(state["s1.p"]) and not np.isfinite(state["s2.p"]), "negative control: inf goes in"
    assert np.isfinite(state["d1.kernel"]).all() and tl.changed_tensors(before, state, ["d1.kernel"])


def test_a_non_finite_loss_is_named_loss():
    ft = everything_trains()
    x, y = diverging(ft, bad_batch=0, n=BATCH)
    trainer = started(ft, SPEC)   # (reseeds the dropout's RNG stream)
    before = ft.state()
    trainer.step(x, y)
    trainer.finish()
    assert trainer.nonfinite == "loss"
    assert tl.changed_tensors(before, ft.state()) == {}, "RNG counts included: a refused step changes nothing"


def test_the_pipelined_epoch_stops_at_the_refused_step_and_later_dispatches_change_nothing():
    ft = everything_trains()
    x, y = diverging(ft, bad_batch=2)
    start = ft.state()
    trainer = started(ft, SPEC)
    dispatched, calls = [], []
    dispatch = trainer._dispatch
    trainer._dispatch = lambda *a: dispatched.append(1) or dispatch(*a)
    outs = trainer.epoch(x, y, None, batches(48), calls.append, lrs=[1e-2] * 6)
    trainer.finish()
    assert len(outs) == 3 and trainer.nonfinite == "loss", "the outputs up to and including the refused step"
    assert np.isfinite(outs[1]).all()
    assert len(dispatched) == 2 + 1 + trainer.PIPELINE_DEPTH, "steps were dispatched after the refused one"
    assert trainer.updates == 2 and set(trainer.export_state()["steps"].values()) == {2}
    state, opt = trained_on(start, x, y, batches(48)[:2])
    assert tl.changed_tensors(state, ft.state()) == {}, "bit-identical to a run of the two finite steps"
    assert_same_optimizer_state(opt, trainer.export_state())

    # sticky: a later epoch runs one step that changes nothing, and returns it
    assert len(trainer.epoch(x, y, None, batches(48)[3:], lrs=[1e-2] * 3)) == 1
    trainer.finish()
    assert tl.changed_tensors(state, ft.state()) == {} and trainer.nonfinite == "loss"
    trainer.resume()
    assert trainer.nonfinite is None
    assert len(trainer.epoch(x, y, None, batches(48)[3:], lrs=[1e-2] * 3)) == 3 and trainer.nonfinite is None
    trainer.finish()
    assert tl.changed_tensors(state, ft.state()), "after resume, steps train again"


def test_unguarded_epoch_trains_the_overflow_into_the_weights_and_compiles_separately():
    ft = everything_trains()
    x, y = diverging(ft, bad_batch=0)
    # SGD: the overflowing loss's huge gradient goes into the weights (Adam's update would stay bounded)
    trainer = started(ft, TrainSpec(tl.optim.SGD(lr=1e-3), MSE(), guard=False))
    assert len(trainer.epoch(x, y, None, batches(48), lrs=[1e-3] * 6)) == 6 and trainer.nonfinite is None
    trainer.finish()
    assert any(not np.isfinite(v).all() for v in ft.state().values()), "negative control"
    guarded = started(ft, TrainSpec(tl.optim.SGD(lr=1e-3), MSE()))
    assert guarded.compiled is not trainer.compiled, "guard is part of the step's static configuration"


def test_float16_gradient_overflow_is_skipped_by_the_loss_scale_not_reported():
    m = spiky_model(boost=1e3)   # p's gradient: 1e3 * sum|g|, finite in float32, inf in float16 at scale 2**16
    x, y = spiky_data()
    before = m.state()
    trainer = started(m, TrainSpec(tl.optim.SGD(lr=1e-3), precision="float16"))
    out = trainer.step(x, y)
    trainer.finish()
    assert np.isfinite(out).all() and trainer.nonfinite is None, "an overflowing gradient is not divergence"
    assert float(trainer.loss_scale.scale) == 2.0**15, "the loss scale skipped the step and halved"
    assert tl.changed_tensors(before, m.state()) == {}
    # the same step in float32 trains (the gradient is finite there)
    f32 = started(m, TrainSpec(tl.optim.SGD(lr=1e-3)))
    f32.step(x, y)
    f32.finish()
    assert f32.nonfinite is None and "s1.p" in tl.changed_tensors(before, m.state())

    # a non-finite loss is divergence under float16 too; the loss scale is left as it was
    ft = everything_trains()
    xb, yb = diverging(ft, bad_batch=0, n=BATCH)
    trainer = started(ft, TrainSpec(tl.optim.Adam(lr=1e-2), MSE(), precision="float16"))
    before = ft.state()
    trainer.loss_scale = LossScale(jnp.float32(2.0**10), jnp.int32(3))
    trainer.step(xb, yb)
    trainer.finish()
    assert trainer.nonfinite == "loss" and tl.changed_tensors(before, ft.state()) == {}
    assert float(trainer.loss_scale.scale) == 2.0**10 and int(trainer.loss_scale.good_steps) == 3


def test_an_epoch_interrupted_from_on_step_leaves_the_state_of_the_steps_dispatched():
    ft = everything_trains()
    x, y = diverging(ft, bad_batch=5)
    y[5 * BATCH + 1] = 0.0   # all finite
    start = ft.state()
    trainer = started(ft, SPEC)
    calls = []

    def on_step(n):
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.epoch(x, y, None, batches(48), on_step, lrs=[1e-2] * 6)
    trainer.finish()
    assert trainer.updates == 3 and trainer.nonfinite is None
    state, opt = trained_on(start, x, y, batches(48)[:3])
    assert tl.changed_tensors(state, ft.state()) == {}, "weights, statistics and RNG of the same (third) step"
    assert_same_optimizer_state(opt, trainer.export_state())


def test_an_interrupted_epoch_still_reads_the_flag_of_a_refused_step_it_dispatched():
    ft = everything_trains()
    x, y = diverging(ft, bad_batch=1)
    start = ft.state()
    trainer = started(ft, SPEC)
    calls = []

    def on_step(n):
        calls.append(n)
        if len(calls) == 3:   # the refused step (1) was dispatched, its flag not read yet
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.epoch(x, y, None, batches(48), on_step, lrs=[1e-2] * 6)
    trainer.finish()
    assert trainer.nonfinite == "loss" and trainer.updates == 1
    state, _ = trained_on(start, x, y, batches(48)[:1])
    assert tl.changed_tensors(state, ft.state()) == {}


def test_the_guard_does_not_add_compilations():
    ft = everything_trains()
    x, y = diverging(ft, bad_batch=1, n=24)
    kw = dict(epochs=2, batch_size=BATCH, shuffle=False, loss="mse", optimizer=tl.optim.SGD(lr=1e-3),
              progress=False, cache_features=False)
    y[BATCH + 1] = 0.0
    assert ft.fit(x, y, **kw).info["compilations"] <= 1
    assert ft.fit(x, y, **kw).info["compilations"] == 0
