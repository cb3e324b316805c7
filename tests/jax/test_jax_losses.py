"""The JAX step minimises ``tlcore.losses``' weighted losses with PyTorch's exact semantics (class
weights, sample weights, soft labels, label smoothing, ``pos_weight``, Huber), and returns the logits
of its training forward pass: one and two steps of ``fit`` are checked against the numpy reference
(``spec.reference_grad`` + ``ReferenceOptimizer``) on every path a batch can take (the compiled epoch,
step by step from a stream, the head on cached features), each with negative controls (the same
data with the weights dropped, or averaged over samples instead of over the weights) that the
comparison tells apart."""
from __future__ import annotations

import re

import numpy as np
import pytest

import tlcore as tl
from tlcore.losses import BinaryCrossEntropy, CrossEntropy, Huber, LossSpec, as_loss
from tlcore.optim import TrainSpec
from tlcore.testing import reference_finetune, sample_data
from tlcore.testing.reference import ReferenceOptimizer

pytest.importorskip("flax", reason="the JAX backend (jax, flax, optax) is not installed")

from tlcore_jax import train  # noqa: E402
from jaxpr_walk import conv_count  # noqa: E402

BATCH, OUTPUTS = 8, 3
OPTIMIZER = tl.optim.SGD(lr=0.5, momentum=0.9)  # SGD: the gradient's scale shows (Adam would hide it)
RTOL, ATOL = 2e-5, 2e-6

#: name -> (loss given to fit, fit's class_weight, targets, with sample weights)
CASES = {
    "class_weight": ("cross_entropy", {0: 3.0, 2: 0.25}, "labels", False),
    "sample_weight": ("cross_entropy", None, "labels", True),
    "class_and_sample_weight_smoothing": (CrossEntropy(label_smoothing=0.2), [0.5, 2.0, 1.5], "labels", True),
    "soft_labels": ("cross_entropy", None, "probabilities", True),
    "soft_labels_smoothing_class_weight": (CrossEntropy(label_smoothing=0.1, class_weight={1: 4.0}), None,
                                           "probabilities", True),
    "bce_pos_weight": (BinaryCrossEntropy(pos_weight=[3.0, 0.5, 1.5]), None, "binary", True),
    "huber": (Huber(delta=0.5), None, "values", True),
}


def head_on_pooled_features() -> tl.Model:
    """Everything before a linear head frozen and deterministic: the head's input is ``features(x)``."""
    model = tl.get_backend("jax").reference_model(seed=0)
    return tl.finetune(model, cut=tl.LayerCut(at="pool"), head=tl.Head.linear(OUTPUTS), seed=3)


def make_data(kind: str, n: int, weighted: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
    if kind == "labels":
        y = rng.integers(0, OUTPUTS, size=n)
    elif kind == "probabilities":
        y = rng.dirichlet(np.ones(OUTPUTS), size=n).astype(np.float32)
    elif kind == "binary":  # hard 0/1 and soft targets
        y = np.where(rng.uniform(size=(n, OUTPUTS)) < 0.5, rng.integers(0, 2, size=(n, OUTPUTS)),
                     rng.uniform(size=(n, OUTPUTS))).astype(np.float32)
    else:  # regression targets far enough from the outputs that Huber is linear for many
        y = (3.0 * rng.normal(size=(n, OUTPUTS))).astype(np.float32)
    w = None
    if weighted:
        w = rng.uniform(0.0, 2.0, size=n).astype(np.float32)
        w[1] = 0.0  # a sample that weighs nothing
    return x, y, w


def expected(ft: tl.Model, x, y, w, grad_fn, spec: LossSpec) -> tuple[dict, float]:
    """The head's weights after unshuffled steps of ``BATCH`` with the logits' gradient
    ``grad_fn(logits, y, w)``, and the epoch's loss as the core reports it (from each step's logits
    before its update: ``sum num / sum den`` over the batches)."""
    feats = ft.features(x).astype(np.float64)
    state = ft.state()
    params = {"weight": state["head.out.weight"].astype(np.float64), "bias": state["head.out.bias"].astype(np.float64)}
    opt, num, den = ReferenceOptimizer(OPTIMIZER), 0.0, 0.0
    for start in range(0, len(x), BATCH):
        b = slice(start, start + BATCH)
        wb = None if w is None else w[b]
        logits = feats[b] @ params["weight"].T + params["bias"]
        n_b, d_b = spec.reference_sums(logits, y[b], wb)
        num, den = num + n_b, den + d_b
        dlogits = grad_fn(logits, y[b], wb)
        params = opt.step(params, {"weight": dlogits.T @ feats[b], "bias": dlogits.sum(axis=0)})
    return params, num / den


def fit(ft: tl.Model, x, y, w, loss, class_weight, path: str) -> tl.History:
    kw = dict(epochs=1, batch_size=BATCH, shuffle=False, optimizer=OPTIMIZER, loss=loss, class_weight=class_weight,
              progress=False, cache_features=path == "cached")
    if path == "stream":  # batches from a generator function: the core calls trainer.step per batch
        def batches():
            for s in range(0, len(x), BATCH):
                b = slice(s, s + BATCH)
                yield (x[b], y[b]) if w is None else (x[b], y[b], w[b])
        return ft.fit(batches, **kw)
    return ft.fit(x, y, sample_weight=w, **kw)


def max_diff(state: dict, params: dict) -> float:
    return max(float(np.abs(state[f"head.out.{k}"] - params[k]).max()) for k in ("weight", "bias"))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("path", ["epoch", "stream", "cached"])
@pytest.mark.parametrize("case", list(CASES))
def test_weighted_losses_train_as_the_numpy_reference(case, path, steps):
    loss, class_weight, kind, weighted = CASES[case]
    spec = tl.losses.with_class_weight(as_loss(loss), class_weight)
    ft = head_on_pooled_features()
    x, y, w = make_data(kind, steps * BATCH, weighted)
    want, want_loss = expected(ft, x, y, w, spec.reference_grad, spec)
    hist = fit(ft, x, y, w, loss, class_weight, path)
    assert hist.info["steps"] == steps
    assert hist.info["cache_features"] == ("used" if path == "cached" else "off")
    state = ft.state()
    for name in ("weight", "bias"):
        np.testing.assert_allclose(state[f"head.out.{name}"], want[name], rtol=RTOL, atol=ATOL, err_msg=name)
    # the loss the core computed from the step's logits: those of the training forward pass, before the update
    assert abs(hist["loss"][0] - want_loss) < 1e-5 * max(1.0, abs(want_loss))

    # negative controls: the plausible mistakes land measurably elsewhere
    plain = as_loss(spec.kind)  # no class weights, smoothing, pos_weight; Huber's default delta
    controls = {"weights and options dropped": lambda z, t, s: plain.reference_grad(z, t, None)}
    if weighted or (spec.class_weight is not None and kind == "labels"):
        def mean_over_samples(z, t, s):  # sum(w * l) / n instead of / sum(w * d)
            return spec.reference_grad(z, t, s) * spec.reference_sums(z, t, s)[1] / len(z)
        controls["mean over samples"] = mean_over_samples
    for what, grad_fn in controls.items():
        wrong, _ = expected(head_on_pooled_features(), x, y, w, grad_fn, spec)
        assert max_diff(state, wrong) > 100 * ATOL, f"negative control not told apart: {what}"


def test_zero_weights_are_ignored_and_uniform_weights_change_nothing():
    """Sample weights scale nothing but the samples' shares: all-equal weights train as none, and a
    sample weighing 0 trains as if it were not there (negative control: its label does matter
    without the zero weight)."""
    x, y, _ = make_data("labels", BATCH, False)
    states = {}
    for name, w in {"none": None, "uniform": np.full(BATCH, 2.5, np.float32)}.items():
        ft = head_on_pooled_features()
        fit(ft, x, y, w, "cross_entropy", None, "epoch")
        states[name] = ft.state()
    np.testing.assert_allclose(states["uniform"]["head.out.weight"], states["none"]["head.out.weight"],
                               rtol=1e-5, atol=1e-6)
    w = np.ones(BATCH, np.float32)
    w[0] = 0.0
    flipped = y.copy()
    flipped[0] = (y[0] + 1) % OUTPUTS
    for weights, same in ((w, True), (None, False)):
        got = []
        for labels in (y, flipped):
            ft = head_on_pooled_features()
            fit(ft, x, labels, weights, "cross_entropy", None, "epoch")
            got.append(ft.state()["head.out.weight"])
        assert np.array_equal(got[0], got[1]) == same


def test_steps_return_the_training_logits_and_an_epoch_returns_each_steps_in_order():
    ft = reference_finetune("jax", tl.FreezePolicy.none(), dropout=0.0)
    x, y = sample_data(ft, n=40)
    w = np.random.default_rng(0).uniform(size=40).astype(np.float32)
    trainer = ft._make_trainer(TrainSpec(OPTIMIZER, CrossEntropy(label_smoothing=0.1)))
    before = ft.predict(x[:8])
    out = trainer.step(x[:8], y[:8], w[:8])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == before.shape == (8, 3)
    # the first step's logits are the model's before the update (BatchNorm in training mode: batch statistics)
    assert not np.allclose(out, before, atol=1e-4), "training mode, not inference mode"
    trainer.finish()
    batches = [np.arange(i, i + 8) for i in range(0, 40, 8)][::-1]  # more batches than the pipeline is deep
    assert len(batches) > trainer.PIPELINE_DEPTH
    results = {}
    for how in ("epoch", "step"):
        trainer.reset(0)
        if how == "epoch":
            counted = []
            results[how] = trainer.epoch(x, y, w, batches, counted.append)
            assert counted == [1] * len(batches)
        else:
            results[how] = [trainer.step(x[b], y[b], w[b]) for b in batches]
    assert [o.shape for o in results["epoch"]] == [(8, 3)] * len(batches)
    for a, b in zip(results["epoch"], results["step"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(results["epoch"][0], results["epoch"][-1]), "each step's own logits"


def test_the_loss_spec_is_static_config_and_weights_cost_one_trace():
    train.clear_cache()
    ft = head_on_pooled_features()
    x, y, w = make_data("labels", 16, True)
    kw = dict(epochs=2, batch_size=BATCH, optimizer=OPTIMIZER, progress=False, cache_features=False)
    assert ft.fit(x, y, **kw).info["compilations"] == 1
    assert ft.fit(x, y, sample_weight=w, **kw).info["compilations"] == 1, "with weights: one more trace"
    assert ft.fit(x, y, sample_weight=w, **kw).info["compilations"] == 0
    assert ft.fit(x, y, **kw).info["compilations"] == 0
    # another loss spec is another step; the same spec is shared across models
    assert ft.fit(x, y, class_weight={1: 2.0}, **kw).info["compilations"] == 1
    assert head_on_pooled_features().fit(x, y, class_weight={1: 2.0}, **kw).info["compilations"] == 0
    assert ft.fit(x, y, loss=CrossEntropy(label_smoothing=0.1), **kw).info["compilations"] == 1


@pytest.mark.parametrize("loss", [CrossEntropy(label_smoothing=0.1, class_weight=[1.0, 2.0, 0.5]),
                                  BinaryCrossEntropy(pos_weight=2.0), Huber(delta=0.3)])
def test_weighted_losses_compute_no_gradient_for_frozen_parameters(loss):
    ft = reference_finetune("jax")
    x, y = sample_data(ft, n=16)
    if loss.kind != "cross_entropy":
        y = np.random.default_rng(0).uniform(size=(16, 3)).astype(np.float32)
    w = np.linspace(0.0, 2.0, 16).astype(np.float32)
    trainer = ft._make_trainer(TrainSpec(tl.optim.Adam(lr=1e-2), loss, 1.0))
    # the reference network cut after relu2 runs two convolutions forward, and none backward
    assert conv_count(trainer.jaxpr(x, y, w).jaxpr) == 2
    assert len(re.findall(r"\bconvolution\(", trainer.compiled_text(x, y, w))) == 2


