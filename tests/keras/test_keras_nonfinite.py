"""Keras: the non-finite step guard (``TrainSpec.guard``) inside the compiled steps, the model's
(``KerasTrainer``, a ``tf.cond`` on a flag kept in a variable) and a head's on cached features
(``SharedStepTrainer``, the flag carried through the graph loop). A step whose loss or a gradient is
not finite changes nothing (BatchNorm moving statistics and seed states restored) and names what
was not finite (``trainer.nonfinite``); later steps change nothing until ``reset``/``resume``; under
float16 an overflowing gradient is the loss scale's business; and an epoch interrupted from
``on_step`` leaves the model as the steps completed so far left it."""
import numpy as np
import pytest

import tlcore as tl
from tlcore.losses import MSE
from tlcore.optim import TrainSpec
from tlcore.testing import reference_finetune, sample_data, selected_backends

if "keras" not in selected_backends():
    pytest.skip("keras is not in TLCORE_TEST_BACKENDS", allow_module_level=True)

BACKEND = tl.get_backend("keras")  # before `import keras`: makes Keras run on TensorFlow

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tlcore_keras.train import KerasTrainer, SharedStepTrainer  # noqa: E402

L = keras.layers
BATCH = 8


# ---------------------------------------------------------------- a parameter with a chosen gradient
def scaled_by(x, p, boost: float | None):
    """``x * p``; ``x``'s gradient is the true one, ``p``'s ``inf`` (``boost=None``) or
    ``boost * sum|dy|`` (computed in the step's compute dtype)."""

    @tf.custom_gradient
    def f(x, p):
        def grad(dy):
            if boost is None:
                dp = tf.fill(tf.shape(p), tf.constant(np.inf, p.dtype))
            else:
                dp = tf.cast(tf.reduce_sum(tf.abs(dy)) * tf.constant(boost, dy.dtype), p.dtype)
            return dy * p, dp
        return x * p, grad

    return f(x, p)


class Spike(L.Layer):
    def __init__(self, boost: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.boost = boost

    def build(self, input_shape):
        self.p = self.add_weight(shape=(), initializer="ones", name="p")

    def call(self, x):
        return scaled_by(x, tf.convert_to_tensor(self.p), self.boost)


def spiky_model(boost: float | None = None) -> tl.Model:
    return tl.wrap(keras.Sequential([keras.Input((4,)), L.Dense(5, name="d1"), Spike(boost, name="s1"),
                                     L.Dense(3, name="d2"), Spike(boost, name="s2")]))


def spiky_data(n: int = BATCH):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n)


def started(model: tl.Model, spec: TrainSpec):
    trainer = model._make_trainer(spec)
    trainer.reset(0)
    return trainer


# ---------------------------------------------------------------- data whose loss overflows
def everything_trains() -> tl.Model:
    """The reference finetune with nothing frozen (BatchNorm statistics move) and dropout (seed states)."""
    ft = reference_finetune("keras", freeze=tl.FreezePolicy.none(), dropout=0.25)
    ft.build(sample_data(ft, n=2)[0])
    return ft


def diverging(ft: tl.Model, bad_batch: int | None, n: int = 48):
    """Regression targets whose batch ``bad_batch`` holds one so large that the squared error is inf."""
    x, _ = sample_data(ft, n=n)
    y = np.random.default_rng(1).normal(size=(n, 3)).astype(np.float32)
    if bad_batch is not None:
        y[bad_batch * BATCH + 1] = 3e30
    return x, y


def batches(n: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]


SPEC = TrainSpec(tl.optim.Adam(lr=1e-2), MSE())


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["steps"] == b["steps"]
    for name, slots in a["slots"].items():
        for k, v in slots.items():
            np.testing.assert_array_equal(v, b["slots"][name][k], err_msg=f"{k} of {name}")


def run_of(start: dict, x, y, steps: list, head: bool = False) -> tuple[dict, dict]:
    """State and optimizer state of a fresh model from ``start`` after an epoch of ``steps`` (the
    model's step, or with ``head`` its head's on the features ``x``)."""
    other = everything_trains()
    other.load_state(start)
    owner = other.head_model() if head else other
    trainer = started(owner, SPEC)
    trainer.epoch(x, y, None, steps, lrs=[1e-2] * len(steps))
    trainer.finish()
    return owner.state(), trainer.export_state()


# ---------------------------------------------------------------- tests
def test_the_first_parameter_whose_gradient_is_not_finite_is_named_and_nothing_changes():
    m = spiky_model()
    x, y = spiky_data()
    before = m.state()
    trainer = started(m, TrainSpec(tl.optim.SGD(lr=0.1, momentum=0.9)))
    assert isinstance(trainer, KerasTrainer)
    out = trainer.step(x, y)
    assert np.isfinite(out).all(), "the loss is finite: only the gradients of s1.p and s2.p are not"
    assert trainer.nonfinite == "s1.p", "the first of the two (in the trainer's order) is named"
    assert tl.changed_tensors(before, m.state()) == {}
    assert set(trainer.export_state()["steps"].values()) == {0}
    trainer.step(x[::-1].copy(), y[::-1].copy())
    assert trainer.nonfinite == "s1.p" and tl.changed_tensors(before, m.state()) == {}, "sticky"
    trainer.reset(0)
    assert trainer.nonfinite is None

    unguarded = started(m, TrainSpec(tl.optim.SGD(lr=0.1, momentum=0.9), guard=False))
    unguarded.step(x, y)
    assert unguarded.nonfinite is None
    state = m.state()
    assert not np.isfinite(state["s1.p"]) and not np.isfinite(state["s2.p"]), "negative control: inf goes in"
    assert np.isfinite(state["d1.kernel"]).all() and tl.changed_tensors(before, state, ["d1.kernel"])


def test_a_non_finite_loss_is_named_loss_and_batchnorm_statistics_and_seeds_are_restored():
    ft = everything_trains()
    x, y = diverging(ft, bad_batch=0, n=BATCH)
    trainer = started(ft, SPEC)   # (reseeds the dropout)
    before = ft.state()
    trainer.step(x, y)
    assert trainer.nonfinite == "loss"
    assert tl.changed_tensors(before, ft.state()) == {}, "statistics and seed state included"
    unguarded = started(ft, TrainSpec(tl.optim.Adam(lr=1e-2), MSE(), guard=False))
    before = ft.state()
    unguarded.step(x, y)
    assert {"bn1.moving_mean", "head.drop0.seed_generator_state"} <= set(tl.changed_tensors(before, ft.state())), \
        "negative control: the forward pass does write them"


def test_the_epoch_stops_at_the_refused_step_with_the_state_of_the_finite_steps():
    ft = everything_trains()
    x, y = diverging(ft, bad_batch=2)
    start = ft.state()
    trainer = started(ft, SPEC)
    calls = []
    outs = trainer.epoch(x, y, None, batches(48), calls.append, lrs=[1e-2] * 6)
    trainer.finish()
    assert len(outs) == 3 and calls == [1, 1, 1] and trainer.nonfinite == "loss"
    state, opt = run_of(start, x, y, batches(48)[:2])
    assert tl.changed_tensors(state, ft.state()) == {}, "bit-identical to a run of the two finite steps"
    assert_same_optimizer_state(opt, trainer.export_state())
    assert len(trainer.epoch(x, y, None, batches(48)[3:], lrs=[1e-2] * 3)) == 1, "sticky: one step, no change"
    assert tl.changed_tensors(state, ft.state()) == {}
    trainer.resume()
    assert trainer.nonfinite is None
    assert len(trainer.epoch(x, y, None, batches(48)[3:], lrs=[1e-2] * 3)) == 3
    assert tl.changed_tensors(state, ft.state()), "after resume, steps train again"


@pytest.mark.parametrize("bad_batch", [2, 5])   # in the graph loop of the full batches / the short last one
def test_the_head_on_cached_features_stops_at_the_refused_step(bad_batch):
    ft = everything_trains()
    x, y = diverging(ft, bad_batch, n=44)   # 5 batches of 8 and one of 4
    feats, start = ft.features(x), ft.state()
    head = ft.head_model()
    trainer = started(head, SPEC)
    assert isinstance(trainer, SharedStepTrainer)
    calls = []
    outs = trainer.epoch(feats, y, None, batches(44), calls.append, lrs=[1e-2] * 6)
    trainer.finish()
    assert len(outs) == bad_batch + 1 and calls == [bad_batch + 1] and trainer.nonfinite == "loss"
    state, opt = run_of(start, feats, y, batches(44)[:bad_batch], head=True)
    assert tl.changed_tensors(state, head.state()) == {}, "bit-identical to a run of the finite steps"
    assert_same_optimizer_state(opt, trainer.export_state())
    assert len(trainer.epoch(feats, y, None, batches(44), lrs=[1e-2] * 6)) == 1
    trainer.finish()
    assert tl.changed_tensors(state, head.state()) == {}, "sticky"
    trainer.resume()
    assert trainer.nonfinite is None


def test_float16_gradient_overflow_is_skipped_by_the_loss_scale_not_reported():
    m = spiky_model(boost=1e3)   # p's gradient: 1e3 * sum|dy|, finite in float32, inf in float16 when scaled
    x, y = spiky_data()
    before = m.state()
    trainer = started(m, TrainSpec(tl.optim.SGD(lr=1e-3), precision="float16"))
    scale = float(trainer.scaler.dynamic_scale.numpy())
    out = trainer.step(x, y)
    assert np.isfinite(out).all() and trainer.nonfinite is None, "an overflowing gradient is not divergence"
    assert float(trainer.scaler.dynamic_scale.numpy()) == scale / 2, "the loss scale skipped the step"
    assert tl.changed_tensors(before, m.state()) == {}
    f32 = started(m, TrainSpec(tl.optim.SGD(lr=1e-3)))
    f32.step(x, y)
    assert f32.nonfinite is None and "s1.p" in tl.changed_tensors(before, m.state()), "finite in float32: trains"

    # a non-finite loss is divergence under float16 too; the loss scale is left as it was
    ft = everything_trains()
    xb, yb = diverging(ft, bad_batch=0, n=BATCH)
    trainer = started(ft, TrainSpec(tl.optim.Adam(lr=1e-2), MSE(), precision="float16"))
    before, scale = ft.state(), float(trainer.scaler.dynamic_scale.numpy())
    trainer.step(xb, yb)
    assert trainer.nonfinite == "loss" and tl.changed_tensors(before, ft.state()) == {}
    assert float(trainer.scaler.dynamic_scale.numpy()) == scale


@pytest.mark.parametrize("head", [False, True])
def test_an_epoch_interrupted_from_on_step_leaves_the_state_of_the_completed_steps(head):
    ft = everything_trains()
    x, y = diverging(ft, None)
    start = ft.state()
    owner = ft.head_model() if head else ft
    data = ft.features(x) if head else x
    trainer = started(owner, SPEC)
    calls = []

    def on_step(n):
        calls.append(n)
        if sum(calls) >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.epoch(data, y, None, batches(48), on_step, lrs=[1e-2] * 6)
    trainer.finish()
    done = sum(calls)   # the model's step: 3; the head's graph loop: the whole epoch (6), then on_step
    assert done == (6 if head else 3)
    state, opt = run_of(start, data, y, batches(48)[:done], head=head)
    assert tl.changed_tensors(state, owner.state()) == {}, "weights, statistics and seeds of the same step"
    assert_same_optimizer_state(opt, trainer.export_state())


@pytest.mark.parametrize("cache", [False, True])
def test_the_guard_adds_no_compilations(cache):
    ft = reference_finetune("keras", dropout=0.25) if cache else everything_trains()   # backbone frozen: cached
    x, y = diverging(ft, None, n=24)
    kw = dict(epochs=2, batch_size=BATCH, loss="mse", optimizer=tl.optim.SGD(lr=1e-3),
              progress=False, cache_features=cache)
    first = ft.fit(x, y, **kw).info
    assert first["cache_features"] == ("used" if cache else "off") and first["compilations"] <= 1
    assert ft.fit(x, y, **kw).info["compilations"] == 0


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_guard_flag_names_the_first_nonfinite_gradient_and_ignores_an_overflowing_sum(traced, dtype):
    """guard_flag sums each gradient on every step and tests element by element only when a sum is
    not finite: gradients whose sum overflows but whose elements are all finite pass (a negative
    control of that shortcut; float16 is summed in float32), an inf or NaN anywhere names its tensor,
    the loss comes first, and a set flag stays; in float32, bfloat16 and float16."""
    from tlcore_keras.train import FLAG_LOSS, FLAG_OK, guard_flag

    def flag(grads, loss=1.0, before=FLAG_OK):
        args = (tf.constant(before, tf.int32), tf.constant(loss, tf.float32),
                [None if g is None else tf.cast(tf.constant(g, tf.float32), dtype) for g in grads])
        fn = tf.function(guard_flag, autograph=False) if traced else guard_flag
        return int(fn(*args))

    # finite elements whose sum in the gradient's dtype is inf (float16: 6e4 each, summed in float32)
    huge = np.full(4, 6e4 if dtype == "float16" else 3e38, np.float32)
    with np.errstate(over="ignore"):
        assert np.isinf(huge.astype(dtype if dtype == "float16" else np.float32).sum())
    assert flag([huge, huge]) == FLAG_OK
    assert flag([np.ones(3), None, np.array([1.0, np.inf])]) == 3
    assert flag([np.array([np.nan, 1.0]), np.array([np.inf])]) == 1
    assert flag([huge, np.array([-np.inf, np.inf])]) == 2  # (an inf and a -inf: their sum is NaN)
    assert flag([np.array([np.inf])], loss=np.inf) == FLAG_LOSS
    assert flag([np.array([np.inf])], before=2) == 2
