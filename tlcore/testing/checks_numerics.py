"""Conformance: a training step computes exactly PyTorch's update, checked against the numpy
reference (:mod:`tlcore.testing.reference`), for every optimizer rule and loss.

The reference network is cut after its global pool and given a linear head with everything before
it frozen, so the head's input is the 2-D ``features(x)`` on every backend and its gradient is known
in closed form. Two steps are taken (so momentum and moments carry over), without shuffling.
"""
from __future__ import annotations

import numpy as np

import tlcore as tl

from ._kit import check
from .reference import ReferenceOptimizer, linear_head_grads

SPECS = {
    "sgd": (tl.optim.SGD(lr=0.1), None),
    "sgd_momentum_nesterov_wd": (tl.optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05), None),
    "adam": (tl.optim.Adam(lr=0.01), None),
    "adam_l2_clipped": (tl.optim.Adam(lr=0.01, weight_decay=0.1), 0.05),
    "adamw": (tl.optim.AdamW(lr=0.01, weight_decay=0.1), None),
    "rmsprop": (tl.optim.RMSprop(lr=0.01), None),
    "rmsprop_centered_momentum_wd": (tl.optim.RMSprop(lr=0.01, momentum=0.5, centered=True, weight_decay=0.05), 1.0),
}
N, BATCH, CLASSES = 16, 8, 3


def head_on_pooled_features(backend: str, num_outputs: int) -> tl.Model:
    model = tl.get_backend(backend).reference_model(seed=0)
    return tl.finetune(model, cut=tl.LayerCut(at="pool"), head=tl.Head.linear(num_outputs), seed=3)


def expected_steps(ft: tl.Model, x, targets, loss: str, spec, clip) -> tuple[dict, float]:
    """The head's weights after one epoch of ``N / BATCH`` unshuffled steps, and the epoch's mean loss."""
    feats = ft.features(x).astype(np.float64)
    assert feats.ndim == 2, f"features after a global pool must be 2-D, got {feats.shape}"
    state = ft.state()
    params = {"weight": state["head.out.weight"].astype(np.float64), "bias": state["head.out.bias"].astype(np.float64)}
    opt, total = ReferenceOptimizer(spec, clip_grad_norm=clip), 0.0
    for start in range(0, N, BATCH):
        batch = slice(start, start + BATCH)
        value, grads = linear_head_grads(feats[batch], params["weight"], params["bias"], targets[batch], loss)
        params = opt.step(params, grads)
        total += value * BATCH
    return params, total / N


@check(cases={name: {"spec": name} for name in SPECS})
def check_one_step_matches_numpy_reference(backend, spec):
    spec, clip = SPECS[spec]
    for cache in (False, True):
        ft = head_on_pooled_features(backend, CLASSES)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(N, *ft.input_shape)).astype(np.float32)
        y = rng.integers(0, CLASSES, size=N)
        want, loss = expected_steps(ft, x, y, "cross_entropy", spec, clip)
        hist = ft.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, optimizer=spec, clip_grad_norm=clip,
                      progress=False, cache_features=cache)
        assert hist.info["cache_features"] == ("used" if cache else "off")
        state = ft.state()
        for name in ("weight", "bias"):
            np.testing.assert_allclose(state[f"head.out.{name}"], want[name], rtol=2e-5, atol=2e-6, err_msg=name)
        assert abs(hist["loss"][0] - loss) < 1e-5 * max(1.0, loss)


@check(cases={"binary_cross_entropy": {"loss": "binary_cross_entropy"}, "mse": {"loss": "mse"}})
def check_loss_gradients_match_numpy_reference(backend, loss):
    ft = head_on_pooled_features(backend, 2)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, *ft.input_shape)).astype(np.float32)
    targets = (rng.uniform(size=(N, 2)) if loss == "binary_cross_entropy" else rng.normal(size=(N, 2))).astype(np.float32)
    spec = tl.optim.SGD(lr=0.5, momentum=0.9)
    want, value = expected_steps(ft, x, targets, loss, spec, None)
    hist = ft.fit(x, targets, epochs=1, batch_size=BATCH, shuffle=False, optimizer=spec, loss=loss, progress=False)
    state = ft.state()
    for name in ("weight", "bias"):
        np.testing.assert_allclose(state[f"head.out.{name}"], want[name], rtol=2e-5, atol=2e-6, err_msg=name)
    assert abs(hist["loss"][0] - value) < 1e-5 * max(1.0, value)
