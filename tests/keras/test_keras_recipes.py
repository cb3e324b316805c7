"""The Keras trainers under the fine-tuning contract: per-step rates from a schedule with layer-wise
multipliers (read back from the Keras optimizer), PyTorch's param groups (AdamW with layer decay and
``no_decay``), optimizer state exported and imported in the framework-neutral layout, tensors unfrozen
mid-run (zero moments, their own step count, as ``add_param_group``), and fits that continue."""
import dataclasses

import numpy as np
import pytest

import tlcore as tl
from tlcore.optim import TrainSpec
from tlcore.schedules import Cosine, OneCycle
from tlcore.testing import reference_finetune, sample_data, selected_backends

if "keras" not in selected_backends():
    pytest.skip("keras is not in TLCORE_TEST_BACKENDS", allow_module_level=True)

BACKEND = tl.get_backend("keras")  # before `import keras`: makes Keras run on TensorFlow

import keras  # noqa: E402

try:  # the conftest imports torch before tensorflow, as one process needs
    import torch
except ImportError:  # pragma: no cover
    torch = None
from tlcore_keras import train as ktrain  # noqa: E402
from tlcore_keras.train import KerasTrainer, SharedStepTrainer  # noqa: E402

L = keras.layers
needs_torch = pytest.mark.skipif(torch is None, reason="comparing with torch.optim needs torch")


def mlp(seed: int = 0) -> tl.Model:
    """``d1`` (6 -> 5, ReLU) and ``d2`` (5 -> 3), seeded; Keras' names and layouts (``d1.kernel`` (in, out))."""
    inputs = keras.Input((6,))
    init = lambda s: keras.initializers.GlorotUniform(seed=seed + s)  # noqa: E731
    h = L.Dense(5, activation="relu", name="d1", kernel_initializer=init(0), bias_initializer="ones")(inputs)
    return tl.wrap(keras.Model(inputs, L.Dense(3, name="d2", kernel_initializer=init(1))(h)))


def mlp_data(n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, n)


def torch_mlp(state: dict):
    """The same network in torch, with ``state``'s (Keras') weights."""
    d1, d2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)
    with torch.no_grad():
        for layer, name in ((d1, "d1"), (d2, "d2")):
            layer.weight.copy_(torch.from_numpy(state[f"{name}.kernel"].T.copy()))
            layer.bias.copy_(torch.from_numpy(state[f"{name}.bias"].copy()))
    params = {"d1.kernel": d1.weight, "d1.bias": d1.bias, "d2.kernel": d2.weight, "d2.bias": d2.bias}
    return (lambda x: d2(torch.relu(d1(x)))), params


def torch_step(net, opt, x, y) -> None:
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y.astype(np.int64)))
    opt.zero_grad()
    loss.backward()
    opt.step()


def assert_matches_torch(model: tl.Model, params: dict) -> None:
    state = model.state()
    for name, p in params.items():
        want = p.detach().numpy()
        np.testing.assert_allclose(state[name], want.T if want.ndim == 2 else want, rtol=1e-5, atol=1e-6,
                                   err_msg=name)


# ------------------------------------------------------------------------------------ rates per step
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_per_step_rates_read_from_the_keras_optimizer_are_the_schedules_times_the_multipliers(optimizer):
    """Each step's rate, as the Keras optimizer computed it (its per-group rates, and Keras' own
    ``learning_rate``: the base rate), is ``schedule.lr_at(step) * multiplier`` for every tensor, on
    the whole model's step and on the head's shared step (cached features: the head's tensors are
    looked up under their names in the whole model)."""
    schedule = OneCycle(max_lr=0.05, total_steps=8)
    ft = reference_finetune("keras", tl.FreezePolicy.none())
    groups = tl.LayerGroups.auto(ft)
    kind = {"sgd": lambda **k: tl.optim.SGD(momentum=0.9, **k), "adamw": lambda **k: tl.optim.AdamW(**k)}[optimizer]
    opt = kind(lr=schedule, weight_decay=0.01, lr_mult=tl.LayerDecay(0.6, groups), no_decay="1d")
    plan = tl.groups.plan_params(opt, ft)
    mult = {n: m for n, _, m, _ in plan.entries}
    assert len(set(mult.values())) == len(groups) > 3
    spec = TrainSpec(opt, params=plan)
    x, y = sample_data(ft, n=8)

    trainer = ft._make_trainer(spec)
    assert isinstance(trainer, KerasTrainer)
    trainer.reset(0)
    for step in range(8):
        base = schedule.lr_at(step)
        trainer.step(x, y, None, base)
        applied = trainer.applied_lr()
        assert set(applied) == {n for n, t in ft.trainable_mask().items() if n in mult and t}
        for name, lr in applied.items():
            assert abs(lr - base * mult[name]) <= 1e-7 * base * mult[name], (step, name, lr, base * mult[name])
        assert float(trainer.optimizer.learning_rate.numpy()) == np.float32(base)

    # the head's shared step (cached features): its tensors are named without the head's prefix
    opt = kind(lr=schedule, lr_mult=tl.LayerDecay(0.3, tl.LayerGroups([r"^head\.fc0\.", r"^(?!head\.fc0\.)"])))
    plan = tl.groups.plan_params(opt, ft)
    mult = {n: m for n, _, m, _ in plan.entries}
    assert mult["head.fc0.weight"] == 0.3 and mult["head.out.weight"] == 1.0
    ft.freeze(tl.FreezePolicy.all())
    shared = ft.head_model()._make_trainer(TrainSpec(opt, params=plan))
    assert isinstance(shared, SharedStepTrainer)
    shared.reset(0)
    feats = ft.features(x)
    for step in range(1, 4):
        base = schedule.lr_at(step)
        shared.step(feats, y, None, base)
        applied = shared.applied_lr()
        assert sorted(applied) == ["fc0.bias", "fc0.weight", "out.bias", "out.weight"]
        for name, lr in applied.items():
            want = base * mult[f"{ft.head}.{name}"]
            assert abs(lr - want) <= 1e-7 * want, (step, name, lr, want)


def test_fit_reports_the_rates_it_applied():
    opt = tl.optim.Adam(lr=Cosine(peak_lr=1e-2, total_steps=10, warmup_steps=2))
    ft = reference_finetune("keras")
    x, y = sample_data(ft, n=24)
    hist = ft.fit(x, y, epochs=2, batch_size=8, optimizer=opt, progress=False, cache_features=False)
    np.testing.assert_allclose(hist.info["lr_steps"], opt.schedule.lr_at(np.arange(6)), rtol=1e-12)
    last = opt.schedule.lr_at(5)
    applied = ft._run.live[0].applied_lr()
    assert applied and all(abs(v - last) <= 1e-7 * last for v in applied.values())


# ------------------------------------------------------------------------------------ param groups
@needs_torch
@pytest.mark.parametrize("cache", [False, True], ids=["whole_model", "shared_head_step"])
def test_adamw_with_layer_decay_and_no_decay_matches_torch_param_groups(cache):
    """Four PyTorch param groups: (0.5, wd), (0.5, 0) for ``d1``'s kernel and bias, (1, wd), (1, 0)
    for ``d2``'s; AdamW's decoupled decay at each group's own rate; a cosine schedule with warmup;
    3 steps. Also with ``d2`` as a head trained on cached features (its shared step)."""
    schedule = Cosine(peak_lr=0.05, total_steps=6, warmup_steps=1)
    groups = tl.LayerGroups([r"^d1\.", r"^d2\."])
    opt = tl.optim.AdamW(lr=schedule, weight_decay=0.2, lr_mult=tl.LayerDecay(0.5, groups), no_decay="1d")
    x, y = mlp_data()
    if not cache:
        model = mlp()
        start = model.state()
        hist = model.fit(x, y, epochs=3, batch_size=len(x), shuffle=False, optimizer=opt, progress=False)
        assert hist.info["steps"] == 3
    else:  # the same network as a frozen base (d1) and a tlcore linear head (head.out) on cached features;
        # the head's weight in the first group (rate 0.5), its bias in the last (rate 1, no decay)
        inputs = keras.Input((6,))
        base = keras.Model(inputs, L.Dense(5, activation="relu", name="d1", bias_initializer="ones")(inputs))
        model = tl.finetune(tl.wrap(base), cut=tl.LayerCut(), head=tl.Head.linear(3), seed=1)
        groups = tl.LayerGroups([r"^head\.out\.weight", r"^d1\.|^head\.out\.bias"])
        opt = tl.optim.AdamW(lr=schedule, weight_decay=0.2, lr_mult=tl.LayerDecay(0.5, groups), no_decay="1d")
        start = model.state()
        hist = model.fit(x, y, epochs=3, batch_size=len(x), shuffle=False, optimizer=opt, progress=False)
        assert hist.info["cache_features"] == "used"
    plan = {n: (m, wd) for n, _, m, wd in tl.groups.plan_params(opt, model).entries}

    if not cache:
        net, params = torch_mlp(start)
        names = list(params)
    else:
        d1 = torch.nn.Linear(6, 5)
        out = torch.nn.Linear(5, 3)
        with torch.no_grad():
            d1.weight.copy_(torch.from_numpy(start["d1.kernel"].T.copy()))
            d1.bias.copy_(torch.from_numpy(start["d1.bias"].copy()))
            out.weight.copy_(torch.from_numpy(start["head.out.weight"].copy()))  # canonical: (out, in)
            out.bias.copy_(torch.from_numpy(start["head.out.bias"].copy()))
        net = lambda t: out(torch.relu(d1(t)))  # noqa: E731
        params = {"head.out.weight": out.weight, "head.out.bias": out.bias}
        names = list(params)
        for p in (d1.weight, d1.bias):
            p.requires_grad_(False)
    by_group: dict = {}
    for name in names:
        by_group.setdefault(plan[name], []).append(params[name])
    assert len(by_group) == (4 if not cache else 2)
    torch_opt = torch.optim.AdamW([{"params": ps, "lr": schedule.lr_at(0) * m, "weight_decay": wd, "mult": m}
                                   for (m, wd), ps in by_group.items()])
    for step in range(3):
        for group in torch_opt.param_groups:
            group["lr"] = schedule.lr_at(step) * group["mult"]
        torch_step(net, torch_opt, x, y)
    state = model.state()
    for name in names:
        want = params[name].detach().numpy()
        got = state[name].T if name.endswith("kernel") else state[name]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
        assert not np.allclose(state[name], start[name], atol=1e-4), f"{name} trained"


@needs_torch
def test_every_optimizer_takes_per_tensor_rates_and_decays_as_torch_groups():
    """SGD (Nesterov), Adam and RMSprop (centered, momentum): coupled L2 at each group's own decay,
    each group's own rate."""
    groups = tl.LayerGroups([r"^d1\.", r"^d2\."])
    common = dict(lr=0.02, weight_decay=0.1, lr_mult=tl.LayerDecay(0.25, groups), no_decay=r"bias$")
    specs = {
        "sgd": (tl.optim.SGD(momentum=0.9, nesterov=True, **common),
                lambda g: torch.optim.SGD(g, momentum=0.9, nesterov=True)),
        "adam": (tl.optim.Adam(**common), lambda g: torch.optim.Adam(g)),
        "rmsprop": (tl.optim.RMSprop(momentum=0.5, centered=True, alpha=0.9, eps=1e-6, **common),
                    lambda g: torch.optim.RMSprop(g, momentum=0.5, centered=True, alpha=0.9, eps=1e-6)),
    }
    x, y = mlp_data()
    for kind, (spec, make) in specs.items():
        model = mlp()
        net, params = torch_mlp(model.state())
        model.fit(x, y, epochs=3, batch_size=len(x), shuffle=False, optimizer=spec, progress=False)
        plan = {n: (m, wd) for n, _, m, wd in tl.groups.plan_params(spec, model).entries}
        torch_opt = make([{"params": [params[n]], "lr": 0.02 * plan[n][0], "weight_decay": plan[n][1]} for n in params])
        for _ in range(3):
            torch_step(net, torch_opt, x, y)
        assert_matches_torch(model, params)


# ------------------------------------------------------------------------------------ state in and out
def test_optimizer_state_export_import_round_trip():
    """``export_state`` gives PyTorch's slot names in the tensors' ``state()`` layouts (a canonical
    head's kernels transposed like their weights); another trainer that imports it exports the same
    and trains on exactly as the first."""
    opt = tl.optim.Adam(lr=Cosine(peak_lr=1e-2, total_steps=20))
    ft = reference_finetune("keras", tl.FreezePolicy.up_to("bn1"), dropout=0.3)
    x, y = sample_data(ft, n=24)
    ft.fit(x, y, epochs=2, batch_size=8, optimizer=opt, progress=False, cache_features=False)
    trainer = ft._run.live[0]
    assert isinstance(trainer, KerasTrainer)
    state, weights = trainer.export_state(), ft.state()
    kinds = {t.name: t.kind for t in ft.tensors}
    trained = [n for n, t in ft.trainable_mask().items() if t and kinds[n] in ("param", "bn_param")]
    assert sorted(state["slots"]) == sorted(trained) == sorted(state["steps"])
    assert "conv2.kernel" in state["slots"] and "conv1.kernel" not in state["slots"]  # frozen: no state
    assert set(state["steps"].values()) == {6}
    for name, slots in state["slots"].items():
        assert set(slots) == {"exp_avg", "exp_avg_sq"}
        for value in slots.values():
            assert value.dtype == np.float32 and value.shape == weights[name].shape, name
            assert value.any(), name
    i = [t.name for t in trainer.tensors].index("head.out.weight")
    keras_layout = trainer.optimizer._state["exp_avg"][i].numpy()
    np.testing.assert_array_equal(state["slots"]["head.out.weight"]["exp_avg"], keras_layout.T)  # (out, in)
    assert keras_layout.shape == weights["head.out.weight"].shape[::-1]

    other = reference_finetune("keras", tl.FreezePolicy.up_to("bn1"), dropout=0.3)
    other.load_state(weights)
    spec = TrainSpec(opt, seed=4)
    again = other._make_trainer(spec)
    again.resume()
    again.import_state(state)
    assert_same_state(again.export_state(), state)
    lr = opt.schedule.lr_at(6)
    trainer.step(x[:8], y[:8], None, lr)
    again.step(x[:8], y[:8], None, lr)
    assert tl.changed_tensors(ft.state(), other.state()) == {}

    head_state = {"slots": {n[len("head."):]: v for n, v in state["slots"].items() if n.startswith("head.")},
                  "steps": {n[len("head."):]: v for n, v in state["steps"].items() if n.startswith("head.")}}
    shared = other.head_model()._make_trainer(spec)  # the head's shared step: the same layouts
    assert isinstance(shared, SharedStepTrainer)
    shared.resume()
    shared.import_state(head_state)
    assert_same_state(shared.export_state(), head_state)



def assert_same_state(got: dict, want: dict) -> None:
    """Two exported optimizer states hold the same step counts and slot values, bit for bit."""
    assert got["steps"] == want["steps"]
    for name, slots in want["slots"].items():
        for slot, value in slots.items():
            np.testing.assert_array_equal(got["slots"][name][slot], value, err_msg=f"{name}/{slot}")

def test_import_checks_shapes_and_leaves_absent_tensors_at_zero():
    ft = reference_finetune("keras")
    trainer = ft._make_trainer(TrainSpec(tl.optim.Adam(lr=1e-3)))
    trainer.reset(0)
    assert trainer.export_state()["slots"] == {n: {} for n in trainer.export_state()["steps"]}
    shape = ft.state()["head.out.weight"].shape
    with pytest.raises(ValueError, match="head.out.weight/exp_avg"):
        trainer.import_state({"slots": {"head.out.weight": {"exp_avg": np.zeros(shape[::-1], np.float32)}},
                              "steps": {"head.out.weight": 1}})
    trainer.import_state({"slots": {"head.out.weight": {"exp_avg": np.ones(shape, np.float32),
                                                        "exp_avg_sq": np.ones(shape, np.float32)}},
                          "steps": {"head.out.weight": 5}})
    state = trainer.export_state()
    assert state["steps"] == {"head.fc0.weight": 0, "head.fc0.bias": 0, "head.out.weight": 5, "head.out.bias": 0}
    assert state["slots"]["head.fc0.weight"] == {}
    np.testing.assert_array_equal(state["slots"]["head.out.weight"]["exp_avg"], np.ones(shape, np.float32))


# ------------------------------------------------------------------------------------ unfreezing mid-run
@needs_torch
@pytest.mark.parametrize("how", ["two_fits", "unfreeze_schedule"])
def test_tensor_unfrozen_mid_run_starts_with_zero_moments_and_its_own_step_count(how):
    """``d2`` trains 2 steps alone, then ``d1`` joins: its moments start at zero and its bias
    corrections count its own steps (1, 2), as torch's ``add_param_group``; ``d2`` goes on (3, 4)."""
    schedule = Cosine(peak_lr=0.05, total_steps=8)
    opt = tl.optim.AdamW(lr=schedule, weight_decay=0.1)
    x, y = mlp_data()
    model = mlp()
    net, params = torch_mlp(model.state())
    frozen, full = tl.FreezePolicy.up_to("d1"), tl.FreezePolicy.none()
    kw = dict(batch_size=len(x), shuffle=False, optimizer=opt, progress=False)
    if how == "two_fits":
        model.freeze(frozen)
        model.fit(x, y, epochs=2, **kw)
        assert set(model._run.live[0].export_state()["steps"]) == {"d2.kernel", "d2.bias"}
        model.freeze(full)
        model.fit(x, y, epochs=2, **kw)
    else:
        model.fit(x, y, epochs=4, freeze=tl.UnfreezeSchedule([(0, frozen), (2, full)]), **kw)

    torch_opt = torch.optim.AdamW([params["d2.kernel"], params["d2.bias"]], lr=schedule.lr_at(0), weight_decay=0.1)
    for step in range(4):
        if step == 2:
            torch_opt.add_param_group({"params": [params["d1.kernel"], params["d1.bias"]]})
        for group in torch_opt.param_groups:
            group["lr"] = schedule.lr_at(step)
        torch_step(net, torch_opt, x, y)
    assert_matches_torch(model, params)
    steps = {n: int(torch_opt.state[params[n]]["step"]) for n in params}
    assert steps == model._run.live[0].export_state()["steps"] == {"d1.kernel": 2, "d1.bias": 2, "d2.kernel": 4,
                                                                    "d2.bias": 4}


def test_just_unfrozen_tensor_has_no_state_until_it_steps():
    model = mlp()
    x, y = mlp_data()
    model.freeze(tl.FreezePolicy.up_to("d1"))
    model.fit(x, y, epochs=1, batch_size=4, optimizer=tl.optim.Adam(lr=1e-2), progress=False)  # 3 steps
    carried = model._run.live[0].export_state()
    model.freeze(tl.FreezePolicy.none())
    trainer = model._make_trainer(TrainSpec(tl.optim.Adam(lr=1e-2)))
    trainer.resume()
    trainer.import_state(carried)
    state = trainer.export_state()
    assert state["steps"] == {"d1.kernel": 0, "d1.bias": 0, "d2.kernel": 3, "d2.bias": 3}
    assert state["slots"]["d1.kernel"] == {} and state["slots"]["d2.kernel"]["exp_avg"].any()
    assert not any(v.numpy().any() for i, v in enumerate(trainer.optimizer._state["exp_avg"]) if i < 2)
    trainer.step(x[:4], y[:4], None, 1e-2)
    assert trainer.export_state()["steps"] == {"d1.kernel": 1, "d1.bias": 1, "d2.kernel": 4, "d2.bias": 4}


# ------------------------------------------------------------------------------------ fits that continue
COSINE = Cosine(peak_lr=2e-2, total_steps=9)
CONTINUE_CASES = {
    "adam_schedule_cached": dict(cache_features=True, optimizer=tl.optim.Adam(lr=COSINE)),
    "adam_schedule_uncached": dict(cache_features=False, optimizer=tl.optim.Adam(lr=COSINE)),
    "full_finetune_sgd_layer_decay": dict(cache_features=False, freeze=tl.FreezePolicy.none(), layer_decay=0.5,
                                          optimizer=tl.optim.SGD(lr=OneCycle(max_lr=0.05, total_steps=9),
                                                                 momentum=0.9, weight_decay=1e-3, no_decay="1d")),
    "float16_loss_scaling": dict(cache_features=True, precision="float16", optimizer=tl.optim.AdamW(lr=COSINE)),
    "bfloat16_with_validation": dict(cache_features=True, precision="bfloat16", validation=True,
                                     optimizer=tl.optim.Adam(lr=COSINE)),
}


@pytest.mark.parametrize("case", list(CONTINUE_CASES))
def test_fit_twice_equals_one_fit_twice_as_long(case):
    """Bit for bit: the optimizer state, its step (the schedule goes on), the loss scale, the shuffling
    and the dropout draws carry over from one fit to the next (dropout 0.3 in the head, shuffled
    batches of 8 with a shorter last one)."""
    kw = dict(CONTINUE_CASES[case])
    validation = kw.pop("validation", False)
    freeze = kw.pop("freeze", None)
    decay = kw.pop("layer_decay", None)
    if decay is not None:
        groups = tl.LayerGroups.auto(reference_finetune("keras", freeze))
        kw["optimizer"] = dataclasses.replace(kw["optimizer"], lr_mult=tl.LayerDecay(decay, groups))
    states, infos = [], []
    for calls in ((3,), (1, 2), (1, 1, 1)):
        ft = reference_finetune("keras", freeze, dropout=0.3)
        x, y = sample_data(ft, n=20)
        if validation:
            kw["validation_data"] = sample_data(ft, n=8, seed=3)
        for epochs in calls:
            hist = ft.fit(x, y, epochs=epochs, batch_size=8, progress=False, seed=2, **kw)
            infos.append(hist.info)
        states.append(ft.state())
        steps = ft._run.live[0].export_state()["steps"]
        assert steps and set(steps.values()) == {9}
    assert {i["cache_features"] for i in infos} == {"used" if kw["cache_features"] else "off"}
    assert tl.changed_tensors(states[0], states[1]) == {}
    assert tl.changed_tensors(states[0], states[2]) == {}
    assert all(infos[i]["compilations"] == 0 for i in (2, 4, 5)), "a continued fit reuses its step"


def test_a_continued_fit_starts_from_weights_loaded_in_between():
    """The head's shared step holds copies of the weights: a ``load_state`` between two fits must be
    what the second one trains from (plain SGD at a constant rate, no shuffling, no dropout: the
    second fit then equals a new run from the loaded weights)."""
    kw = dict(batch_size=8, shuffle=False, optimizer=tl.optim.SGD(lr=0.1), progress=False, cache_features=True)
    ft = reference_finetune("keras", dropout=0.0)
    x, y = sample_data(ft, n=24)
    ft.fit(x, y, **kw)
    loaded = {k: (v * 0.5 if k.startswith("head.") else v) for k, v in ft.state().items()}
    ft.load_state(loaded)
    hist = ft.fit(x, y, **kw)
    assert hist.info["cache_features"] == "used" and ft._run.live[0].export_state()["steps"]["out.weight"] == 6
    fresh = reference_finetune("keras", dropout=0.0)
    fresh.load_state(loaded)
    fresh.fit(x, y, **kw)
    assert tl.changed_tensors(fresh.state(), ft.state()) == {}


def test_frozen_tensors_stay_bit_identical_with_decay_and_multipliers():
    opt = tl.optim.AdamW(lr=1e-2, weight_decay=0.5, lr_mult=tl.Discriminative(0.1, tl.LayerGroups.auto(
        reference_finetune("keras"))))
    ft = reference_finetune("keras", tl.FreezePolicy.up_to("bn1"))
    x, y = sample_data(ft, n=16)
    snap = tl.snapshot(ft)
    ft.fit(x, y, epochs=2, batch_size=8, optimizer=opt, progress=False)
    checked = tl.assert_frozen(snap, ft)
    assert "conv1.kernel" in checked and "bn1.gamma" in checked
    state = ft._run.live[0].export_state()
    assert "conv1.kernel" not in state["slots"] and "conv2.kernel" in state["slots"]


def test_a_second_model_of_the_same_structure_trains_a_3_stage_schedule_without_compiling(monkeypatch):
    """Every stage's step (the cached head's, then the whole model's for each trainable set) is traced
    once per process: a second model of the same structure traces none, in any stage, and trains bit
    for bit as the first (AdamW with layer decay and a schedule, dropout 0.3 in the head, shuffled
    batches of 8 with a shorter last one). Negative controls: another structure, or the same
    structure unfrozen elsewhere, traces its own whole-model steps."""
    traces = []  # KerasTrainer._train_step runs once per trace
    monkeypatch.setattr(KerasTrainer, "_train_step", lambda self, *a, _step=KerasTrainer._train_step:
                        traces.append(self) or _step(self, *a))

    def fit(ft, where="bn1"):
        plan = tl.UnfreezeSchedule([(0, tl.FreezePolicy.all()), (1, tl.FreezePolicy.up_to(where)),
                                    (2, tl.FreezePolicy.none())])
        opt = tl.optim.AdamW(lr=Cosine(peak_lr=1e-2, total_steps=9, warmup_steps=2), weight_decay=0.05,
                             lr_mult=tl.LayerDecay(0.75, tl.LayerGroups.auto(ft)), no_decay="1d")
        x, y = sample_data(ft, n=20)
        before, head_traces = len(traces), ktrain._traces[0]
        hist = ft.fit(x, y, epochs=3, batch_size=8, optimizer=opt, freeze=plan, seed=2, progress=False)
        assert hist.info["cache_features"][0] == "used" and hist.info["cache_features"][1].startswith("refused")
        return hist, len(traces) - before + ktrain._traces[0] - head_traces

    ktrain.clear_cache()
    first, second = reference_finetune("keras", dropout=0.3), reference_finetune("keras", dropout=0.3)
    hist1, traced1 = fit(first)
    assert traced1 == 3 and hist1.info["compilations"] == 1, "the head's step and two whole-model steps"
    hist2, traced2 = fit(second)
    assert traced2 == 0 and hist2.info["compilations"] == 0
    assert tl.changed_tensors(first.state(), second.state()) == {}
    assert hist1["loss"] == hist2["loss"] and hist1.info["lr_steps"] == hist2.info["lr_steps"]
    for a, b in zip(first._run.live[0].export_state()["slots"].values(),
                    second._run.live[0].export_state()["slots"].values()):
        assert all(np.array_equal(a[k], b[k]) for k in a)

    other = tl.finetune(BACKEND.reference_model(0), cut=tl.LayerCut(at="relu2"),
                        head=tl.Head.mlp(hidden=(6,), num_classes=3, dropout=0.3))  # a head 6 wide, not 8
    assert fit(other)[1] == 3, "another structure: its own steps"
    elsewhere = reference_finetune("keras", dropout=0.3)
    hist, traced = fit(elsewhere, where="conv2")
    assert traced == 1 and hist.info["compilations"] == 0, "another trainable set in stage 1 only"
