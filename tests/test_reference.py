"""``tlcore.testing.reference`` (numpy only) against real PyTorch: optimizers, clipping, losses, gradients."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import tlcore as tl
from tlcore.errors import OptimizerConfigError
from tlcore.testing import reference as ref

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = {"conv.weight": (3, 2, 2), "fc.weight": (4, 5), "fc.bias": (4,)}
STEPS = 5
RTOL, ATOL = 1e-6, 1e-12

SPECS = {
    "sgd": tl.optim.SGD(lr=0.1),
    "sgd_momentum": tl.optim.SGD(lr=0.1, momentum=0.9),
    "sgd_nesterov_wd": tl.optim.SGD(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1),
    "adam": tl.optim.Adam(lr=0.01),
    "adam_wd": tl.optim.Adam(lr=0.01, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-3),
    "adamw": tl.optim.AdamW(lr=0.01, weight_decay=0.1),
    "rmsprop": tl.optim.RMSprop(lr=0.01),
    "rmsprop_centered_mom_wd": tl.optim.RMSprop(lr=0.01, alpha=0.9, eps=1e-3, momentum=0.5, centered=True,
                                                weight_decay=0.1),
}
CLIP = 0.5   # well below the random gradients' global norm (about 5), so clipping really happens


def torch_optimizer(spec: tl.optim.OptimizerSpec, params: list) -> torch.optim.Optimizer:
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                               weight_decay=spec.weight_decay)
    if spec.kind in ("adam", "adamw"):
        cls = torch.optim.Adam if spec.kind == "adam" else torch.optim.AdamW
        return cls(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    return torch.optim.RMSprop(params, lr=spec.lr, alpha=spec.alpha, eps=spec.eps, momentum=spec.momentum,
                               centered=spec.centered, weight_decay=spec.weight_decay)


def random_run(seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """float32 initial parameters and STEPS rounds of float32 gradients."""
    rng = np.random.default_rng(seed)
    params = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    grads = [{n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


def torch_trajectory(spec, clip, params, grads_per_step) -> tuple[list[dict[str, np.ndarray]], dict]:
    """Parameters after each step with torch.optim, in float64; and torch's final state by name."""
    tparams = {n: torch.tensor(p, dtype=torch.float64, requires_grad=True) for n, p in params.items()}
    opt = torch_optimizer(spec, list(tparams.values()))
    out = []
    for grads in grads_per_step:
        for n, p in tparams.items():
            p.grad = torch.tensor(grads[n], dtype=torch.float64)
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(tparams.values()), clip)
            assert norm > clip     # the clipping really changes the gradients
        opt.step()
        out.append({n: p.detach().numpy().copy() for n, p in tparams.items()})
    state = {n: {k: v.numpy() for k, v in opt.state[p].items() if k != "step"} for n, p in tparams.items()}
    return out, state


def reference_trajectory(spec, clip, params, grads_per_step):
    opt = ref.ReferenceOptimizer(spec, clip_grad_norm=clip)
    current = {n: p.astype(np.float64) for n, p in params.items()}
    out = []
    for grads in grads_per_step:
        current = opt.step(current, grads)
        out.append(current)
    return out, opt


def assert_same_trajectory(ours, theirs) -> None:
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=RTOL, atol=ATOL, err_msg=f"{name} at step {step}")


@pytest.mark.parametrize("clip", [None, CLIP], ids=["noclip", "clip"])
@pytest.mark.parametrize("spec_id", list(SPECS))
def test_optimizer_matches_torch(spec_id, clip):
    spec = SPECS[spec_id]
    params, grads = random_run()
    theirs, torch_state = torch_trajectory(spec, clip, params, grads)
    ours, opt = reference_trajectory(spec, clip, params, grads)
    assert_same_trajectory(ours, theirs)
    assert opt.steps == STEPS
    for name in SHAPES:
        assert opt.state[name]["step"] == STEPS
        ours_state = {k: v for k, v in opt.state[name].items() if k != "step"}
        assert ours_state.keys() == torch_state[name].keys()
        for key, value in ours_state.items():
            np.testing.assert_allclose(value, torch_state[name][key], rtol=RTOL, atol=ATOL, err_msg=key)
    # the parameters moved, and not by a tiny amount (so a match is not vacuous)
    assert all(np.abs(ours[-1][n] - params[n]).max() > 1e-3 for n in SHAPES)


@pytest.mark.parametrize(("ours_spec", "their_spec", "ours_clip", "their_clip"), [
    (tl.optim.Adam(lr=0.01, weight_decay=0.1), tl.optim.AdamW(lr=0.01, weight_decay=0.1), None, None),
    (tl.optim.SGD(lr=0.1, momentum=0.9), tl.optim.SGD(lr=0.1, momentum=0.9, nesterov=True), None, None),
    (tl.optim.RMSprop(lr=0.01), tl.optim.RMSprop(lr=0.01, centered=True), None, None),
    (tl.optim.Adam(lr=0.01), tl.optim.Adam(lr=0.01), None, CLIP),
], ids=["adam_vs_adamw", "momentum_vs_nesterov", "rmsprop_vs_centered", "noclip_vs_clip"])
def test_negative_control_comparison_can_fail(ours_spec, their_spec, ours_clip, their_clip):
    params, grads = random_run()
    theirs, _ = torch_trajectory(their_spec, their_clip, params, grads)
    ours, _ = reference_trajectory(ours_spec, ours_clip, params, grads)
    with pytest.raises(AssertionError):
        assert_same_trajectory(ours, theirs)


def test_frozen_tensors_get_no_update_no_state_and_no_part_in_the_clip_norm():
    spec = tl.optim.AdamW(lr=0.01, weight_decay=0.1)
    params, grads = random_run(seed=1)
    trainable = ["fc.weight", "fc.bias"]
    tparams = {n: torch.tensor(p, dtype=torch.float64, requires_grad=n in trainable) for n, p in params.items()}
    opt_t = torch_optimizer(spec, [tparams[n] for n in trainable])
    opt = ref.ReferenceOptimizer(spec, clip_grad_norm=CLIP)
    current = {n: p.astype(np.float64) for n, p in params.items()}
    frozen = current["conv.weight"]
    for g in grads:
        for n in trainable:
            tparams[n].grad = torch.tensor(g[n], dtype=torch.float64)
        torch.nn.utils.clip_grad_norm_([tparams[n] for n in trainable], CLIP)
        opt_t.step()
        current = opt.step(current, {n: g[n] for n in trainable})
    assert current["conv.weight"] is frozen
    assert sorted(opt.state) == sorted(trainable)
    for n in trainable:
        np.testing.assert_allclose(current[n], tparams[n].detach().numpy(), rtol=RTOL, atol=ATOL)


def test_step_computes_in_float64_and_returns_the_params_dtype():
    spec = SPECS["adam_wd"]
    params, grads = random_run()
    theirs, _ = torch_trajectory(spec, CLIP, params, grads)
    opt = ref.ReferenceOptimizer(spec, clip_grad_norm=CLIP)
    current = params
    for g in grads:
        current = opt.step(current, g)
        assert all(current[n].dtype == np.float32 for n in SHAPES)
    assert all(v.dtype == np.float64 for s in opt.state.values() for k, v in s.items() if k != "step")
    for n in SHAPES:
        np.testing.assert_allclose(current[n], theirs[-1][n], rtol=1e-5, atol=1e-6)


def test_optimizer_input_errors():
    with pytest.raises(OptimizerConfigError):
        ref.ReferenceOptimizer("adam")
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(OptimizerConfigError):
            ref.ReferenceOptimizer(tl.optim.SGD(lr=0.1), clip_grad_norm=bad)
    opt = ref.ReferenceOptimizer(tl.optim.SGD(lr=0.1))
    with pytest.raises(KeyError):
        opt.step({"w": np.zeros(2)}, {"v": np.zeros(2)})
    with pytest.raises(ValueError):
        opt.step({"w": np.zeros(2)}, {"w": np.zeros(3)})
    with pytest.raises(TypeError):
        opt.step({"w": np.zeros(2, dtype=np.int64)}, {"w": np.zeros(2)})
    assert opt.steps == 0 and opt.state == {}


def autograd(fn, x: np.ndarray, *args) -> tuple[float, np.ndarray]:
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    value = fn(xt, *args)
    value.backward()
    return value.item(), xt.grad.numpy()


def test_cross_entropy_matches_torch():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(7, 5))
    logits[0, 1] = 800.0                                  # stable for huge logits too
    labels = rng.integers(0, 5, size=7)
    value, grad = autograd(F.cross_entropy, logits, torch.tensor(labels))
    assert ref.cross_entropy(logits, labels) == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(ref.cross_entropy_grad(logits, labels), grad, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError):
        ref.cross_entropy(logits, np.full(7, 5))
    with pytest.raises(ValueError):
        ref.cross_entropy(logits, labels.astype(np.float64))


def test_binary_cross_entropy_with_logits_matches_torch():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(6, 3))
    logits[0, :] = [1000.0, -1000.0, 60.0]               # numerically stable at the extremes
    targets = rng.uniform(size=(6, 3))
    targets[1] = [0.0, 1.0, 1.0]
    value, grad = autograd(F.binary_cross_entropy_with_logits, logits, torch.tensor(targets))
    assert ref.binary_cross_entropy_with_logits(logits, targets) == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(ref.binary_cross_entropy_with_logits_grad(logits, targets), grad,
                               rtol=1e-9, atol=1e-15)
    assert np.isfinite(ref.binary_cross_entropy_with_logits(logits, targets))


def test_mse_matches_torch():
    rng = np.random.default_rng(4)
    pred, target = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    value, grad = autograd(F.mse_loss, pred, torch.tensor(target))
    assert ref.mse(pred, target) == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(ref.mse_grad(pred, target), grad, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError):
        ref.mse(pred, target[:, :2])


@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "mse"])
def test_linear_head_grads_match_autograd(loss):
    rng = np.random.default_rng(5)
    n, d, out = 6, 4, 3
    x = rng.normal(size=(n, d))
    w, b = rng.normal(size=(out, d)), rng.normal(size=out)
    if loss == "cross_entropy":
        targets, torch_loss = rng.integers(0, out, size=n), F.cross_entropy
    elif loss == "binary_cross_entropy":
        targets, torch_loss = rng.integers(0, 2, size=(n, out)).astype(np.float64), F.binary_cross_entropy_with_logits
    else:
        targets, torch_loss = rng.normal(size=(n, out)), F.mse_loss
    wt = torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True)
    expected = torch_loss(F.linear(torch.tensor(x), wt, bt), torch.tensor(targets))
    expected.backward()
    value, grads = ref.linear_head_grads(x, w, b, targets, loss)
    assert value == pytest.approx(expected.item(), rel=1e-12)
    assert grads.keys() == {"weight", "bias"}
    np.testing.assert_allclose(grads["weight"], wt.grad.numpy(), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(grads["bias"], bt.grad.numpy(), rtol=1e-9, atol=1e-15)
    # float32 parameters get float32 gradients
    _, g32 = ref.linear_head_grads(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), targets, loss)
    assert g32["weight"].dtype == np.float32 and g32["bias"].dtype == np.float32


def test_linear_head_grads_input_errors():
    x, w, b = np.zeros((2, 3)), np.zeros((4, 3)), np.zeros(4)
    with pytest.raises(OptimizerConfigError):
        ref.linear_head_grads(x, w, b, np.zeros(2, dtype=np.int64), "hinge")
    with pytest.raises(ValueError):
        ref.linear_head_grads(x, np.zeros((4, 2)), b, np.zeros(2, dtype=np.int64), "cross_entropy")
    with pytest.raises(ValueError):
        ref.linear_head_grads(x, w, b, np.zeros((2, 3)), "mse")


def test_accuracy_matches_torch():
    rng = np.random.default_rng(6)
    logits, labels = rng.normal(size=(20, 4)), rng.integers(0, 4, size=20)
    expected = (torch.tensor(logits).argmax(dim=1) == torch.tensor(labels)).double().mean().item()
    assert ref.accuracy(logits, labels) == expected


def test_reference_imports_no_framework():
    code = ("import sys, tlcore.testing.reference; "
            "bad = [m for m in ('torch', 'tensorflow', 'keras', 'jax', 'flax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
