"""Mixed precision on JAX: ``fit(precision="bfloat16"|"float16")`` computes the step's matmuls and
convolutions in that dtype (checked in the jaxpr, against float32 as the negative control), keeps
float32 master weights, optimizer state and BatchNorm statistics, leaves frozen tensors bit-identical,
compiles one step per precision, and scales float16's loss dynamically."""
from __future__ import annotations

import re

import numpy as np
import pytest

import tlcore as tl
from tlcore.optim import TrainSpec
from tlcore.testing import reference_finetune, sample_data

pytest.importorskip("flax", reason="the JAX backend (jax, flax, optax) is not installed")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tlcore_jax import train  # noqa: E402
from jaxpr_walk import equations  # noqa: E402
from tlcore_jax.train import LossScale  # noqa: E402

HEAVY_OPS = ("dot_general", "conv_general_dilated")
FORWARD_CONVS = 2  # the reference network cut after relu2 has two convolutions


def heavy_ops(jaxpr) -> list[tuple[str, set[str]]]:
    """Every matmul and convolution of a jaxpr (nested jaxprs included) with its operands' dtypes."""
    return [(eqn.primitive.name, {str(v.aval.dtype) for v in eqn.invars}) for eqn in equations(jaxpr)
            if eqn.primitive.name in HEAVY_OPS]


def compute_dtypes(jaxpr) -> set[str]:
    return set().union(*(dtypes for _, dtypes in heavy_ops(jaxpr)))


def trainer_for(model: tl.Model, precision: str, optimizer=None):
    """A trainer started as the core starts a run."""
    trainer = model._make_trainer(TrainSpec(optimizer or tl.optim.Adam(lr=1e-2), precision=precision))
    trainer.reset(0)
    return trainer


def float_dtypes(tree) -> set[str]:
    return {str(a.dtype) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


def float_leaves(tree) -> list[np.ndarray]:
    """Copies of the floating-point arrays of ``tree`` (RNG keys and counters left out), in order."""
    return [np.asarray(a) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]


def fit(model, x, y, precision, **kw):
    return model.fit(x, y, epochs=kw.pop("epochs", 1), batch_size=16, optimizer=tl.optim.Adam(lr=1e-2),
                     progress=False, precision=precision, cache_features=kw.pop("cache_features", False), **kw)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_the_step_computes_matmuls_and_convolutions_in_the_precision(precision):
    ft = reference_finetune("jax", tl.FreezePolicy.up_to("bn1"))  # conv2 trains: backward convolutions too
    x, y = sample_data(ft, n=16)
    trainer = trainer_for(ft, precision)
    jaxpr = trainer.jaxpr(x, y)
    assert compute_dtypes(jaxpr.jaxpr) == {precision}, "float32 is the negative control"
    # master weights, optimizer state and trainable BatchNorm statistics stay float32
    trainer.step(x, y)
    assert float_dtypes((trainer.trainable, trainer.opt_state, trainer.mutable)) == {"float32"}
    # every float output of the step (state, loss scale, and the logits it returns) is float32
    assert {str(v.dtype) for v in jaxpr.out_avals if jnp.issubdtype(v.dtype, jnp.floating)} == {"float32"}
    logits = trainer.step(x, y)
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32 and logits.shape == (16, 3)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_computes_no_gradient_for_frozen_parameters(precision):
    ft = reference_finetune("jax")  # everything before the head frozen
    x, y = sample_data(ft, n=16)
    trainer = trainer_for(ft, precision)
    assert {".".join(map(str, p)) for p in trainer.trainable_paths} == {
        "head.fc0.weight", "head.fc0.bias", "head.out.weight", "head.out.bias"}
    convs = [name for name, _ in heavy_ops(trainer.jaxpr(x, y).jaxpr) if name == "conv_general_dilated"]
    assert len(convs) == FORWARD_CONVS, "no backward convolution"
    assert len(re.findall(r"\bconvolution\(", trainer.compiled_text(x, y))) == FORWARD_CONVS


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_fit_trains_keeps_frozen_bit_identical_and_float32_state(precision):
    states = {}
    for prec in ("float32", precision):
        ft = reference_finetune("jax", tl.FreezePolicy.up_to("bn1"), dropout=0.0)
        x, y = sample_data(ft, n=64)
        snap, before = tl.snapshot(ft), ft.evaluate(x, y)["loss"]
        fit(ft, x, y, prec, epochs=6)
        assert ft.evaluate(x, y)["loss"] < 0.5 * before, "it trains"
        checked = tl.assert_frozen(snap, ft)
        assert {"conv1.kernel", "bn1.mean", "bn1.scale"} <= set(checked)
        changed = tl.changed_tensors(snap, ft.state())
        assert {"conv2.kernel", "bn2.mean", "bn2.var", "head.out.weight"} <= set(changed)
        assert {v.dtype for v in ft.state().values()} == {np.dtype("float32")}
        states[prec] = ft.state()
    # negative control: the reduced precision did compute differently
    assert tl.changed_tensors(states["float32"], states[precision], ["conv2.kernel", "head.out.weight"])


def test_mixed_precision_on_cached_features_trains_the_head():
    ft = reference_finetune("jax")
    x, y = sample_data(ft, n=48)
    snap = tl.snapshot(ft)
    hist = ft.fit(x, y, epochs=2, batch_size=16, progress=False, precision="bfloat16")
    assert hist.info["cache_features"] == "used"
    tl.assert_frozen(snap, ft)
    assert "head.out.weight" in tl.changed_tensors(snap, ft.state())
    assert {v.dtype for n, v in ft.state().items() if "rngs" not in n} == {np.dtype("float32")}


def test_each_precision_compiles_its_own_step_once():
    train.clear_cache()
    ft = reference_finetune("jax")
    x, y = sample_data(ft, n=32)
    assert fit(ft, x, y, "float32").info["compilations"] == 1
    assert fit(ft, x, y, "bfloat16").info["compilations"] == 1, "another precision is another step"
    assert fit(ft, x, y, "bfloat16", epochs=2).info["compilations"] == 0
    assert fit(ft, x, y, "float32").info["compilations"] == 0
    assert fit(reference_finetune("jax", seed=4), x, y, "bfloat16").info["compilations"] == 0, "shared"
    assert {key[1].precision for key in train._STEPS} == {"float32", "bfloat16"}


def test_float16_skips_a_step_with_overflowing_gradients_and_halves_the_scale():
    ft = reference_finetune("jax", tl.FreezePolicy.up_to("bn1"))
    x, y = sample_data(ft, n=16)
    trainer = trainer_for(ft, "float16")
    assert float(trainer.loss_scale.scale) == 2.0**16
    trainer.loss_scale = LossScale(jnp.float32(2.0**40), jnp.int32(5))  # 2**40 overflows float16's gradients
    before = float_leaves((trainer.trainable, trainer.mutable, trainer.opt_state))
    trainer.step(x, y)
    assert float(trainer.loss_scale.scale) == 2.0**39 and int(trainer.loss_scale.good_steps) == 0
    after = float_leaves((trainer.trainable, trainer.mutable, trainer.opt_state))
    assert len(after) == len(before) > 10
    for old, new in zip(before, after):  # weights, BatchNorm statistics, moments: kept
        np.testing.assert_array_equal(new, old)
    # negative control: with a scale float16 can hold, the same step trains and counts a good step
    trainer.loss_scale = LossScale(jnp.float32(2.0**10), jnp.int32(0))
    trainer.step(x, y)
    assert int(trainer.loss_scale.good_steps) == 1 and float(trainer.loss_scale.scale) == 2.0**10
    moved = [not np.array_equal(n, o) for n, o in zip(float_leaves(trainer.trainable), before)]
    assert len(moved) == len(trainer.trainable) and all(moved)


def test_float16_loss_scale_doubles_after_a_run_of_finite_steps():
    ft = reference_finetune("jax")
    x, y = sample_data(ft, n=16)
    trainer = trainer_for(ft, "float16")
    trainer.loss_scale = LossScale(jnp.float32(2.0**10), jnp.int32(train.LOSS_SCALE_GROWTH_INTERVAL - 1))
    trainer.step(x, y)
    assert float(trainer.loss_scale.scale) == 2.0**11 and int(trainer.loss_scale.good_steps) == 0
    trainer.reset(0)
    assert float(trainer.loss_scale.scale) == 2.0**16, "every fit starts from the initial scale"
