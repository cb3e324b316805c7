"""The JAX trainer under fine-tuning recipes and continued runs: per-parameter learning rates and
weight decay as PyTorch's param groups (the rate of every step read back from the optimizer state),
per-parameter step counts, the optimizer state exported and imported in the framework-neutral layout,
and fits that continue bit for bit where the last one stopped."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import tlcore as tl
from tlcore import groups
from tlcore.optim import TrainSpec
from tlcore.schedules import Cosine, Linear
from tlcore.testing import reference_finetune, sample_data
from tlcore.testing.reference import ReferenceOptimizer

pytest.importorskip("flax", reason="the JAX backend (jax, flax, optax) is not installed")
from flax import nnx  # noqa: E402

from tlcore_jax import train  # noqa: E402
from jaxpr_walk import conv_count  # noqa: E402


def started(model: tl.Model, optimizer, **kw) -> train.JaxTrainer:
    """A trainer for ``optimizer`` with its parameter plan, started as the core starts a run."""
    plan = groups.plan_params(optimizer, model) if optimizer.lr_mult or optimizer.no_decay else None
    trainer = model._make_trainer(TrainSpec(optimizer, params=plan, **kw))
    trainer.reset(0)
    return trainer




def assert_same_state(a: dict, b: dict) -> None:
    assert a["steps"] == b["steps"]
    assert a["slots"].keys() == b["slots"].keys()
    for name, slots in a["slots"].items():
        assert slots.keys() == b["slots"][name].keys(), name
        for k, v in slots.items():
            np.testing.assert_array_equal(v, b["slots"][name][k], err_msg=f"{name} {k}")


# ---------------------------------------------------------------- learning rates


@pytest.mark.parametrize("decay, tol", [(0.5, 1e-7), (0.7, 2e-7)], ids=["dyadic", "any"])
def test_the_rate_of_every_step_is_the_schedule_times_the_multiplier_read_from_the_optimizer_state(decay, tol):
    """The step takes the base rate as a float32 scalar and multiplies it by the parameter's float32
    multiplier: one rounding of the rate (a power-of-two multiplier is exact), at most three with any
    multiplier (the rate, the multiplier, their product: < 1.8e-7)."""
    ft = reference_finetune("jax", tl.FreezePolicy.up_to("bn1"))
    x, y = sample_data(ft, n=48)
    opt = tl.optim.AdamW(lr=Cosine(peak_lr=3e-2, total_steps=10, warmup_steps=3), weight_decay=0.05,
                         lr_mult=tl.LayerDecay(decay, tl.LayerGroups.auto(ft)), no_decay="1d")
    trainer = started(ft, opt)
    mult = {n: m for n, (m, _) in groups.plan_params(opt, ft).lookup().items()}
    assert {mult[n] for n in trainer.names} == {decay ** 2, decay, 1.0}, "conv2, bn2, the head"
    batches = [np.arange(i, i + 8) for i in range(0, 48, 8)]
    rates = opt.schedule.lr_at(np.arange(2 * len(batches)))
    seen = []
    trainer.epoch(x, y, None, batches, lambda n: seen.append(trainer.applied_lr()), list(rates[:6]))
    for i in range(6, 12):  # and one step at a time
        trainer.step(x[batches[i - 6]], y[batches[i - 6]], None, float(rates[i]))
        seen.append(trainer.applied_lr())
    assert len(seen) == 12 and set(seen[0]) == set(trainer.names)
    for step, applied in enumerate(seen):
        for name, lr in applied.items():
            want = rates[step] * mult[name]
            assert abs(lr - want) <= tol * want, (step, name, lr, want)
    assert seen[0][trainer.names[0]] == 0.0, "warmup starts at 0"


def test_the_rate_reaches_the_state_through_fit_and_a_constant_rate_is_used_without_one():
    ft = reference_finetune("jax")
    x, y = sample_data(ft, n=16)
    opt = tl.optim.SGD(lr=Linear(peak_lr=0.2, total_steps=8, final_lr=0.01), momentum=0.9)
    for k in range(3):  # one step per fit: each continues the run
        hist = ft.fit(x, y, epochs=1, batch_size=16, optimizer=opt, progress=False, cache_features=False)
        want = opt.schedule.lr_at(k)
        assert hist.info["lr_steps"] == [want]
        assert all(abs(v - want) <= 1e-7 * want for v in ft._run.live[0].applied_lr().values())
    trainer = started(ft, tl.optim.SGD(lr=0.3))
    trainer.step(x, y)
    assert set(trainer.applied_lr().values()) == {float(np.float32(0.3))}


def test_learning_rates_are_an_argument_of_the_step_not_a_reason_to_compile():
    train.clear_cache()
    ft = reference_finetune("jax", tl.FreezePolicy.up_to("bn1"))
    x, y = sample_data(ft, n=32)

    def fit(opt):
        return ft.fit(x, y, epochs=2, batch_size=16, optimizer=opt, progress=False, cache_features=False,
                      reset=True).info["compilations"]

    assert fit(tl.optim.Adam(lr=1e-3)) == 1
    assert fit(tl.optim.Adam(lr=Cosine(peak_lr=1e-2, total_steps=4))) == 0, "a schedule is the same step"
    assert fit(tl.optim.Adam(lr=5e-4)) == 0, "another rate is the same step"
    auto = tl.LayerGroups.auto(ft)
    assert fit(tl.optim.Adam(lr=1e-3, lr_mult=tl.LayerDecay(0.5, auto))) == 1, "multipliers are constants"
    assert fit(tl.optim.Adam(lr=2e-3, lr_mult=tl.LayerDecay(0.5, auto))) == 0
    other = reference_finetune("jax", tl.FreezePolicy.up_to("bn1"), seed=3)
    hist = other.fit(x, y, epochs=1, batch_size=16, optimizer=tl.optim.Adam(lr=1e-3, lr_mult=tl.LayerDecay(
        0.5, tl.LayerGroups.auto(other))), progress=False, cache_features=False)
    assert hist.info["compilations"] == 0, "the same plan on a model of the same structure: shared"
    # the rate is a float32 scalar argument of the step; gradients still only for trainable tensors
    trainer = started(ft, tl.optim.AdamW(lr=1e-3, lr_mult=tl.LayerDecay(0.5, auto), no_decay="1d"))
    jaxpr = trainer.jaxpr(x[:16], y[:16])
    assert jaxpr.in_avals[-1].shape == () and jaxpr.in_avals[-1].dtype == np.float32
    assert conv_count(jaxpr.jaxpr) == 3, "forward: conv1, conv2; backward: conv2's kernel only"


def test_a_head_trained_on_cached_features_gets_the_rates_the_plan_gives_it_in_the_whole_model():
    """The plan names the whole model's tensors (``head.out.weight``); the head trained alone on cached
    features names them without the head's prefix, and looks them up with it."""
    plan_opt = tl.optim.AdamW(lr=0.05, weight_decay=0.5, no_decay="1d", lr_mult=tl.LayerDecay(
        0.25, tl.LayerGroups([r"^head\.fc0", r"^head\.out|^conv|^bn"])))
    results = {}
    for cache, opt in ((False, plan_opt), ("auto", plan_opt), ("auto", tl.optim.AdamW(lr=0.05, weight_decay=0.5))):
        ft = reference_finetune("jax", dropout=0.0)
        x, y = sample_data(ft, n=32)
        hist = ft.fit(x, y, epochs=2, batch_size=8, optimizer=opt, shuffle=False, progress=False, cache_features=cache)
        assert hist.info["cache_features"] == ("used" if cache else "off")
        results[cache, opt is plan_opt] = (ft.state(), ft._run.live[0].applied_lr())
    state, applied = results["auto", True]
    assert applied == {"fc0.weight": np.float32(0.0125), "fc0.bias": np.float32(0.0125),
                       "out.weight": np.float32(0.05), "out.bias": np.float32(0.05)}
    for name, value in results[False, True][0].items():
        np.testing.assert_allclose(state[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert "head.out.bias" in tl.changed_tensors(state, results["auto", False][0]), "negative control: no plan"


# ---------------------------------------------------------------- numerics against PyTorch's definitions


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l0, self.l1 = nnx.Linear(5, 6, rngs=rngs), nnx.Linear(6, 4, rngs=rngs)
        self.l2 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(nnx.relu(self.l0(x)))))


def mlp_grads(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
    """Cross entropy's gradients of ``l1`` and ``l2`` (``l0`` frozen), in float64 numpy."""
    h0 = np.maximum(x @ p["l0.kernel"] + p["l0.bias"], 0)
    a1 = h0 @ p["l1.kernel"] + p["l1.bias"]
    h1 = np.maximum(a1, 0)
    g = tl.losses.CrossEntropy().reference_grad(h1 @ p["l2.kernel"] + p["l2.bias"], y)
    g1 = (g @ p["l2.kernel"].T) * (a1 > 0)
    return {"l2.kernel": h1.T @ g, "l2.bias": g.sum(0), "l1.kernel": h0.T @ g1, "l1.bias": g1.sum(0)}


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd"])
def test_layer_decay_and_no_decay_follow_pytorch_param_groups(kind):
    """Groups l0 (frozen), l1 and l2 at LayerDecay 0.5 (rates 0.25, 0.5, 1), biases without decay, a
    warmup schedule: 3 steps against the numpy reference of torch.optim, one optimizer per group."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 5)).astype(np.float32)
    y = rng.integers(0, 3, 24)
    m = tl.wrap(MLP(nnx.Rngs(0)), input_shape=(5,))
    m.freeze(tl.FreezePolicy.matching(r"^l0\."))
    lr = Cosine(peak_lr=0.05, total_steps=4)  # no warmup: the numpy reference takes no rate of 0
    groups_ = tl.LayerGroups([r"^l0\.", r"^l1\.", r"^l2\."])
    opt = {"adamw": tl.optim.AdamW(lr=lr, betas=(0.8, 0.99), weight_decay=0.3),
           "adam": tl.optim.Adam(lr=lr, weight_decay=0.3),
           "sgd": tl.optim.SGD(lr=lr, momentum=0.9, nesterov=True, weight_decay=0.3)}[kind]
    opt = replace(opt, lr_mult=tl.LayerDecay(0.5, groups_), no_decay="1d")
    start = {k: v.astype(np.float64) for k, v in m.state().items()}
    params = dict(start)
    mult = {"l1": 0.5, "l2": 1.0}
    refs = {n: ReferenceOptimizer(replace(opt, lr=1.0, lr_mult=None, no_decay=None,
                                          weight_decay=0.0 if n.endswith("bias") else 0.3))
            for n in mlp_grads(params, x[:8], y[:8])}
    for step in range(3):
        b = slice(8 * step, 8 * step + 8)
        grads = mlp_grads(params, x[b], y[b])
        for n, g in grads.items():
            refs[n].spec = replace(refs[n].spec, lr=lr.lr_at(step) * mult[n[:2]])
            params[n] = refs[n].step({n: params[n]}, {n: g})[n]
    snap = tl.snapshot(m)
    hist = m.fit(x, y, epochs=1, batch_size=8, shuffle=False, optimizer=opt, progress=False)
    assert hist.info["steps"] == 3
    state = m.state()
    for n in refs:
        assert not np.allclose(state[n], start[n]), n
        np.testing.assert_allclose(state[n], params[n], rtol=2e-5, atol=2e-6, err_msg=n)
    assert set(tl.assert_frozen(snap, m)) == {"l0.kernel", "l0.bias"}, "frozen: bit-identical, no decay"
    # the state in torch's slot names, in the tensors' state() layouts, float32
    exported = m._run.live[0].export_state()
    assert set(exported["slots"]) == set(refs) and set(exported["steps"].values()) == {3}
    for n, ref in refs.items():
        slots = exported["slots"][n]
        assert set(slots) == set(ref.state[n]) - {"step"}
        for k, v in slots.items():
            assert v.dtype == np.float32 and v.shape == state[n].shape
            np.testing.assert_allclose(v, ref.state[n][k], rtol=2e-5, atol=1e-7, err_msg=f"{n} {k}")


# ---------------------------------------------------------------- optimizer state across trainers


def test_export_import_round_trip_continues_the_run_exactly():
    opt = tl.optim.RMSprop(lr=1e-2, momentum=0.5, centered=True, weight_decay=0.01)
    a = reference_finetune("jax", tl.FreezePolicy.up_to("bn1"), dropout=0.0)
    x, y = sample_data(a, n=32)
    a.fit(x, y, epochs=1, batch_size=16, optimizer=opt, progress=False, cache_features=False)
    ta = a._run.live[0]
    exported = ta.export_state()
    assert set(exported["steps"].values()) == {2}
    assert all(set(s) == {"square_avg", "grad_avg", "momentum_buffer"} for s in exported["slots"].values())
    state = a.state()
    assert all(v.shape == state[n].shape and v.dtype == np.float32
               for n, s in exported["slots"].items() for v in s.values())
    # another model with the same weights imports it and steps exactly as the exporter does
    b = reference_finetune("jax", tl.FreezePolicy.up_to("bn1"), dropout=0.0)
    b.load_state(state)
    tb = b._make_trainer(TrainSpec(opt))
    tb.resume()
    tb.import_state(exported)
    assert_same_state(tb.export_state(), exported)
    ta.resume()
    for trainer in (ta, tb):
        trainer.step(x[:16], y[:16], None, 1e-2)
        trainer.finish()
    assert tl.changed_tensors(a.state(), b.state()) == {}
    assert_same_state(ta.export_state(), tb.export_state())
    # negative control: zero state steps differently
    c = reference_finetune("jax", tl.FreezePolicy.up_to("bn1"), dropout=0.0)
    c.load_state(state)
    tc = started(c, opt)
    tc.step(x[:16], y[:16], None, 1e-2)
    tc.finish()
    assert tl.changed_tensors(a.state(), c.state())
    # a tensor the state does not name starts at zero with no steps; a wrong shape is a named error
    partial = {"slots": {n: s for n, s in exported["slots"].items() if n != "conv2.kernel"},
               "steps": exported["steps"]}
    tb.import_state(partial)
    again = tb.export_state()
    assert again["steps"]["conv2.kernel"] == 0 and again["slots"]["conv2.kernel"] == {}
    assert again["steps"]["head.out.weight"] == 2
    bad = {"slots": {"head.out.bias": {"square_avg": np.zeros(7, np.float32)}}, "steps": {"head.out.bias": 1}}
    with pytest.raises(tl.TlcoreError, match="head.out.bias"):
        tb.import_state(bad)


def test_resume_reads_the_weights_loaded_since_and_keeps_the_optimizer_state():
    ft = reference_finetune("jax", dropout=0.0)
    x, y = sample_data(ft, n=16)
    opt = tl.optim.Adam(lr=1e-2)
    ft.fit(x, y, epochs=1, batch_size=16, optimizer=opt, progress=False, cache_features=False)
    trainer = ft._run.live[0]
    kept, kept_weights = trainer.export_state(), ft.state()["head.out.weight"]
    loaded = {n: np.zeros_like(v) for n, v in ft.state().items() if n == "head.out.weight"}
    ft.load_state(loaded, strict=False)
    ft.fit(x, y, epochs=1, batch_size=16, optimizer=opt, progress=False, cache_features=False)
    assert ft._run.live[0] is trainer, "the same trainer continues"
    assert trainer.export_state()["steps"]["head.out.weight"] == 2
    # the second step started from the loaded zeros: one Adam step from there is about lr per element
    # (the weights it had trained are an order of magnitude larger)
    assert np.abs(ft.state()["head.out.weight"]).max() <= 2e-2 < np.abs(kept_weights).max()
    assert set(kept["steps"].values()) == {1}


def test_a_zoo_model_exports_its_state_in_pytorch_layouts():
    m = tl.zoo.create("resnet18", backend="jax", input_size=32, width=4, num_classes=3)
    ft = tl.finetune(m, cut=tl.LayerCut(at="layer1"), head=tl.Head.linear(2), freeze=tl.FreezePolicy.up_to("bn1"))
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    ft.fit(x, np.arange(4) % 2, epochs=1, batch_size=4, optimizer=tl.optim.Adam(lr=1e-3), progress=False)
    exported = ft._run.live[0].export_state()
    state = ft.state()
    assert exported["slots"]["layer1.0.conv1.weight"]["exp_avg"].shape == (4, 4, 3, 3)  # (out, in, kh, kw)
    assert all(v.shape == state[n].shape for n, s in exported["slots"].items() for v in s.values())


def check_unfrozen_tensors(exported: dict, before: dict, after: dict, lr: float, betas: tuple) -> None:
    """After one Adam step of conv2 and bn2 (just unfrozen) and a second one of the head: from zero
    moments ``m**2 / v == (1 - b1)**2 / (1 - b2)`` elementwise, and with the tensor's own step count (1)
    the step is ``lr * sign(g)`` (with the head's count, 2, it would be about 0.74 of that)."""
    assert exported["steps"]["head.out.weight"] == 2 and exported["steps"]["conv2.kernel"] == 1
    b1, b2 = betas
    for name in ("conv2.kernel", "bn2.scale"):
        s = exported["slots"][name]
        m, v = s["exp_avg"].astype(np.float64), s["exp_avg_sq"].astype(np.float64)
        big = np.abs(m) > 1e-5  # |g| > 1e-4, far above eps
        assert big.mean() > 0.5, name
        np.testing.assert_allclose(m[big] ** 2 / v[big], (1 - b1) ** 2 / (1 - b2), rtol=1e-4, err_msg=name)
        step = (before[name] - after[name]).astype(np.float64)
        np.testing.assert_allclose(np.abs(step[big]), lr, rtol=1e-3, err_msg=name)
    # negative control: the head's moments were carried over (two gradients in them: the ratio is near
    # 0.19**2 / 0.001999, about 18, not 10)
    s = exported["slots"]["head.out.weight"]
    assert np.median(s["exp_avg"].astype(np.float64) ** 2 / s["exp_avg_sq"]) > 12


def test_a_tensor_unfrozen_mid_run_starts_with_zero_moments_and_its_own_step_count():
    """The trainers as the core hands a run over when the policy changes: the new one resumes and
    imports the old one's state, which does not name the tensors unfrozen since."""
    lr, opt = 1e-3, tl.optim.Adam(lr=1e-3)
    ft = reference_finetune("jax", dropout=0.0)
    x, y = sample_data(ft, n=16)
    first = started(ft, opt)
    first.step(x, y, None, lr)
    first.finish()
    carried = first.export_state()
    assert set(carried["steps"]) == {"head.fc0.weight", "head.fc0.bias", "head.out.weight", "head.out.bias"}
    ft.freeze(tl.FreezePolicy.up_to("bn1"))
    before = ft.state()
    second = ft._make_trainer(TrainSpec(opt))
    second.resume()
    second.import_state(carried)
    second.step(x, y, None, lr)
    second.finish()
    check_unfrozen_tensors(second.export_state(), before, ft.state(), lr, opt.betas)


@pytest.mark.parametrize("cache", [False, "auto"], ids=["uncached", "cached"])
def test_fit_after_unfreezing_carries_the_state_and_starts_the_unfrozen_tensors_at_zero(cache):
    lr, opt = 1e-3, tl.optim.Adam(lr=1e-3)
    ft = reference_finetune("jax", dropout=0.0)
    x, y = sample_data(ft, n=16)
    ft.fit(x, y, epochs=1, batch_size=16, optimizer=opt, progress=False, cache_features=cache)  # the head alone
    ft.freeze(tl.FreezePolicy.up_to("bn1"))
    before = ft.state()
    ft.fit(x, y, epochs=1, batch_size=16, optimizer=opt, progress=False, cache_features=cache)
    check_unfrozen_tensors(ft._run.live[0].export_state(), before, ft.state(), lr, opt.betas)


# ---------------------------------------------------------------- fits that continue


@pytest.mark.parametrize("cache", [False, "auto"], ids=["uncached", "cached"])
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_two_fits_equal_one_fit_twice_as_long_bit_for_bit(cache, precision):
    probe = reference_finetune("jax", dropout=0.3)
    opt = tl.optim.AdamW(lr=Cosine(peak_lr=2e-2, total_steps=12, warmup_steps=2), weight_decay=0.05,
                         lr_mult=tl.LayerDecay(0.5, tl.LayerGroups([r"^head\.fc0", r"^head\.out|^conv|^bn"])),
                         no_decay="1d")
    results = []
    for calls in ((2,), (1, 1)):
        ft = reference_finetune("jax", dropout=0.3)
        x, y = sample_data(ft, n=24)
        for epochs in calls:
            hist = ft.fit(x, y, epochs=epochs, batch_size=8, optimizer=opt, seed=4, progress=False,
                          cache_features=cache, precision=precision)
        assert hist.info["cache_features"] == ("used" if cache else "off")
        results.append((ft.state(), ft._run.live[0].export_state()))
    assert tl.changed_tensors(results[0][0], results[1][0]) == {}
    assert_same_state(results[0][1], results[1][1])
    assert set(results[0][1]["steps"].values()) == {6}
    assert tl.changed_tensors(probe.state(), results[0][0]), "it trained"
