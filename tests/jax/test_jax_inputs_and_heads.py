"""The JAX backend on structured inputs (dicts of keyword inputs, tuples of positional ones, integer
token ids), every head pool against ``tlcore.head.pool_reference`` with and without an attention
mask, the user's own NNX head, layers counted in call order, and bad inputs named before tracing."""
from __future__ import annotations

import os

import numpy as np
import pytest

import tlcore as tl
from tlcore.head import POOLS, HeadError, pool_reference
from tlcore.testing import sample_data

pytest.importorskip("flax", reason="the JAX backend (jax, flax, optax) is not installed")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tlcore_jax import train  # noqa: E402

#: dtypes of the token ids each trace of KeywordNet saw (appended at trace time)
SEEN_IDS: list = []


class KeywordNet(nnx.Module):
    """Two named inputs: token ids (embedded, averaged) and dense features; a classifier on both."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.fc = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, ids: jax.Array, features: jax.Array) -> jax.Array:
        SEEN_IDS.append(ids.dtype)
        h = jnp.concatenate([self.embed(ids).mean(axis=1), nnx.relu(self.dense(features))], axis=-1)
        return self.fc(h)


def keyword_data(n: int = 32, seed: int = 0) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    ids = rng.integers(0, 5, size=(n, 5)) + 5 * y[:, None]  # the ids tell the class
    return {"ids": ids, "features": rng.normal(size=(n, 3)).astype(np.float32)}, y


def fit(model, x, y, **kw):
    kw.setdefault("optimizer", tl.optim.Adam(lr=5e-2))
    return model.fit(x, y, epochs=kw.pop("epochs", 1), batch_size=kw.pop("batch_size", 8), progress=False,
                     cache_features=kw.pop("cache_features", False), **kw)


def token_batch(n: int = 10, seed: int = 0) -> dict:
    """Token ids (N, 6) and an attention mask keeping 1..6 leading tokens per row (1 and 6 included)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, size=n)
    lengths[:2] = (1, 6)
    mask = (np.arange(6) < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(0, 20, size=(n, 6)), "attention_mask": mask}


def tokens_model() -> tl.Model:
    return tl.get_backend("jax").reference_model(seed=0, variant="tokens")


# ---------------------------------------------------------------- structured inputs


@pytest.mark.parametrize("as_tuple", [False, True], ids=["dict", "tuple"])
def test_dict_and_tuple_inputs_fit_predict_and_keep_frozen_bit_identical(as_tuple):
    train.clear_cache()
    m = tl.wrap(KeywordNet(nnx.Rngs(0)))
    x, y = keyword_data()
    if as_tuple:
        x = (x["ids"], x["features"])
    ft = tl.finetune(m, freeze=tl.FreezePolicy.matching(r"^(embed|dense)\."))
    before = ft.predict(x)
    assert before.shape == (32, 2)
    snap = tl.snapshot(ft)
    SEEN_IDS.clear()
    hist = fit(ft, x, y, epochs=3)
    assert hist.info["compilations"] == 1, "12 steps of one batch structure and shape: one compilation"
    assert set(SEEN_IDS) == {jnp.dtype("int32")}, "token ids reach the module as integers (int64 -> int32)"
    checked = tl.assert_frozen(snap, ft)
    assert {"embed.embedding", "dense.kernel", "dense.bias"} == set(checked)
    assert {"fc.kernel", "fc.bias"} <= set(tl.changed_tensors(snap, ft.state())), "the trainable layer moved"
    assert not np.allclose(ft.predict(x), before)
    # positional and keyword inputs are the same computation
    if as_tuple:
        np.testing.assert_allclose(ft.predict(x), ft.predict({"ids": x[0], "features": x[1]}), rtol=1e-6)


def test_dict_batches_compile_once_for_predict_and_for_later_fits():
    ft = tl.finetune(tokens_model(), head=tl.Head.linear(2, pool="mean"))
    x = token_batch(n=24)
    y = np.arange(24) % 2
    ft.predict(x, batch_size=8)
    size = train._infer_leaves._cache_size()
    ft.predict(x, batch_size=8)
    ft.predict(token_batch(n=8, seed=1))
    assert train._infer_leaves._cache_size() == size, "the same dict structure and shapes reuse the compiled pass"
    fit(ft, x, y, epochs=2)
    assert fit(ft, x, y, epochs=2).info["compilations"] == 0


def test_token_ids_stay_integers_and_float_ids_are_refused_by_the_embedding():
    m = tokens_model()
    x = token_batch()
    assert tl.data.as_inputs(x)["input_ids"].dtype == np.int64
    tokens = m.predict(x)
    assert tokens.shape == (10, 6, 8)
    table, s = m.native.embed.embedding[...], m.state()  # the ids index the embedding table
    np.testing.assert_allclose(tokens, np.asarray(table)[x["input_ids"]] @ s["proj.kernel"] + s["proj.bias"],
                               rtol=1e-5, atol=1e-6)
    # negative control: ids given as floats stay floats (tlcore never rounds them), so nnx.Embed refuses them
    with pytest.raises(ValueError, match="integer"):
        m.predict({**x, "input_ids": x["input_ids"].astype(np.float32)})


def test_ids_beyond_int32_are_a_named_error():
    x = token_batch(n=4)
    x["input_ids"][0, 0] = 2**40
    with pytest.raises(tl.DataError, match="int32"):
        tokens_model().predict(x)


# ---------------------------------------------------------------- bad inputs


def test_a_dict_missing_an_argument_is_a_named_error_before_anything_changes():
    ft = tl.finetune(tokens_model(), head=tl.Head.linear(2, pool="mean"))
    snap = tl.snapshot(ft)
    x = token_batch(n=8)
    missing = {"attention_mask": x["attention_mask"]}
    with pytest.raises(tl.DataError, match=r"TokenNet.__call__.*missing a required argument: 'input_ids'.*"
                                           r"keyword inputs \['attention_mask'\]"):
        ft.predict(missing)
    with pytest.raises(tl.DataError, match="'input_ids'"):
        fit(ft, missing, np.zeros(8, int))
    with pytest.raises(tl.DataError, match="'input_ids'"):
        ft.features(missing)
    with pytest.raises(tl.DataError, match="unexpected keyword argument 'token_type_ids'"):
        ft.predict({**x, "token_type_ids": x["input_ids"]})
    with pytest.raises(tl.DataError, match="3 positional input"):
        ft.predict((x["input_ids"], x["attention_mask"], x["attention_mask"]))
    assert tl.changed_tensors(snap, ft.state()) == {}
    # negative control: the same inputs complete, by name or in order, are taken
    assert ft.predict(x).shape == ft.predict((x["input_ids"], x["attention_mask"])).shape == (8, 2)


def test_a_mask_that_does_not_fit_the_tokens_is_a_named_error():
    ft = tl.finetune(tokens_model(), head=tl.Head.linear(2, pool="mean"))
    x = token_batch(n=4)
    with pytest.raises(HeadError, match=r"one mask value per token, shape \(4, 6\)"):
        ft.predict({**x, "attention_mask": np.ones((4, 7), np.int64)})


# ---------------------------------------------------------------- pools


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no_mask"])
@pytest.mark.parametrize("pool", POOLS)
def test_each_pool_matches_the_numpy_reference_through_features_and_predict(pool, masked):
    m = tokens_model()
    x = token_batch()
    if not masked:
        x = {"input_ids": x["input_ids"]}
    tokens = m.predict(x)
    assert tokens.shape == (10, 6, 8)
    ft = tl.finetune(m, head=tl.Head.linear(3, pool=pool))
    assert ft.head_built, "the tokens reference's example input sizes the head without data"
    expected = pool_reference(tokens, pool, x.get("attention_mask"))
    np.testing.assert_allclose(ft.features(x), expected, rtol=1e-5, atol=1e-6)
    s = ft.state()
    np.testing.assert_allclose(ft.predict(x), expected @ s["head.out.weight"].T + s["head.out.bias"], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(ft.head_model().predict(ft.features(x)), ft.predict(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pool", ["mean", "max", "last"])
def test_masked_pools_use_the_mask(pool):
    """Negative control for the test above: on padded rows the mask changes the result."""
    ft = tl.finetune(tokens_model(), head=tl.Head.linear(3, pool=pool))
    x = token_batch()
    with_mask, without = ft.features(x), ft.features({"input_ids": x["input_ids"]})
    padded = x["attention_mask"].sum(axis=1) < 6
    assert not np.allclose(with_mask[padded], without[padded])
    np.testing.assert_allclose(with_mask[~padded], without[~padded], rtol=1e-6)


def test_the_mask_reaches_a_head_appended_to_a_sequential_container():
    """The keyword inputs go to the container's first layer; the head after it gets the mask."""
    from tlcore_jax.backend import TokenNet
    from tlcore_jax.layers import NamedSequential

    net = NamedSequential(tokens=TokenNet(nnx.Rngs(0)), norm=nnx.LayerNorm(8, rngs=nnx.Rngs(1)))
    ft = tl.finetune(tl.wrap(net), head=tl.Head.linear(3, pool="mean"))
    x = token_batch()
    tokens = tl.wrap(net).predict(x)
    np.testing.assert_allclose(ft.features(x), pool_reference(tokens, "mean", x["attention_mask"]), rtol=1e-5,
                               atol=1e-6)
    assert type(ft.native).__name__ == "NamedSequential" and ft.layers[:3] == ["tokens", "norm", "head"]
    s = ft.state()
    np.testing.assert_allclose(ft.predict(x), ft.features(x) @ s["head.out.weight"].T + s["head.out.bias"],
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(ft.predict(x), ft.predict({"input_ids": x["input_ids"]})), "the mask is used"


def test_image_pools_match_the_numpy_reference():
    m = tl.get_backend("jax").reference_model(seed=0)
    x, _ = sample_data(m, n=6)
    conv = tl.finetune(m, cut=tl.LayerCut(at="relu2")).predict(x)
    for pool in ("avg", "max", "flatten"):
        ft = tl.finetune(m, cut=tl.LayerCut(at="relu2"), head=tl.Head.linear(3, pool=pool))
        np.testing.assert_allclose(ft.features(x), pool_reference(conv, pool), rtol=1e-5, atol=1e-6, err_msg=pool)


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_the_mask_reaches_the_head_in_the_training_step(pool):
    """Trained without caching (the mask goes through the compiled step) and on cached pooled
    features (the mask is used once, in features()), the head ends the same."""
    states = {}
    for cache in (False, True):
        ft = tl.finetune(tokens_model(), head=tl.Head.mlp(hidden=(4,), num_classes=2, pool=pool, dropout=0.3))
        x, y = token_batch(n=24), np.arange(24) % 2
        hist = fit(ft, x, y, epochs=2, cache_features=cache, seed=3)
        assert hist.info["cache_features"] == ("used" if cache else "off")
        states[cache] = ft.state()
    for name, value in states[False].items():
        np.testing.assert_allclose(states[True][name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    # negative control: training without the mask ends elsewhere
    ft = tl.finetune(tokens_model(), head=tl.Head.mlp(hidden=(4,), num_classes=2, pool=pool, dropout=0.3))
    fit(ft, {"input_ids": token_batch(n=24)["input_ids"]}, np.arange(24) % 2, epochs=2, seed=3)
    assert tl.changed_tensors(states[False], ft.state())


# ---------------------------------------------------------------- the user's own head


class TokenHead(nnx.Module):
    """A head of the user's own: LayerNorm on the tokens, their mean, a classifier."""

    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.fc = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(self.norm(x).mean(axis=1))


def test_a_native_nnx_head_trains_and_is_saved_with_the_model(tmp_path):
    m = tokens_model()
    head = TokenHead(nnx.Rngs(1))
    ft = tl.finetune(m, head=head)
    assert ft.head == "head" and ft.layers == ["embed", "proj", "head"]
    mask = ft.trainable_mask()
    assert {n for n, t in mask.items() if t} == {"head.norm.scale", "head.norm.bias", "head.fc.kernel", "head.fc.bias"}
    x, y = token_batch(n=24), np.arange(24) % 3
    tokens = m.predict(x)
    np.testing.assert_allclose(ft.features(x), tokens, rtol=1e-6), "no pooling: the head's input as it is"
    np.testing.assert_allclose(ft.predict(x), np.asarray(head(jnp.asarray(tokens))), rtol=1e-5, atol=1e-6)
    snap = tl.snapshot(ft)
    fit(ft, x, y, epochs=2)
    assert tl.assert_frozen(snap, ft) == ["embed.embedding", "proj.bias", "proj.kernel"]
    assert set(tl.changed_tensors(snap, ft.state())) == {n for n, t in mask.items() if t}
    path = os.fspath(tmp_path / "tokens.tl")
    ft.save(path)
    back = tl.load(path, model=tl.get_backend("jax").reference_model(seed=5, variant="tokens").native,
                   head=TokenHead(nnx.Rngs(9)))
    assert tl.changed_tensors(ft.state(), back.state()) == {}
    np.testing.assert_allclose(back.predict(x), ft.predict(x), rtol=1e-6)


def test_a_native_head_trains_the_same_on_cached_features():
    states = {}
    for cache in (False, True):
        ft = tl.finetune(tokens_model(), head=TokenHead(nnx.Rngs(1)))
        hist = fit(ft, token_batch(n=24), np.arange(24) % 3, epochs=3, cache_features=cache, seed=2)
        assert hist.info["cache_features"] == ("used" if cache else "off")
        states[cache] = ft.state()
    assert tl.changed_tensors(tl.finetune(tokens_model(), head=TokenHead(nnx.Rngs(1))).state(), states[True])
    for name, value in states[False].items():
        np.testing.assert_allclose(states[True][name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_head_that_is_not_an_nnx_module_is_refused():
    m = tokens_model()
    for head in (object(), jax.nn.relu):
        with pytest.raises(tl.UnsupportedModelError, match="flax.nnx.Module"):
            tl.finetune(m, head=head)


# ---------------------------------------------------------------- call order


class Reordered(nnx.Module):
    """Defines its classifier first and calls it last."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(8, 3, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.body = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(self.drop(nnx.relu(self.body(x))))


def test_drop_last_and_integer_cuts_count_layers_in_call_order():
    net = Reordered(nnx.Rngs(0))
    m = tl.wrap(net, input_shape=(8,))
    assert m.layers == ["body", "drop", "fc"]
    assert [t.layer for t in m.tensors] == ["body", "body", "drop", "drop", "fc", "fc"]  # drop: its RNG
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    ft = tl.finetune(m, cut=tl.LayerCut(drop_last=1), head=tl.Head.linear(2))
    assert ft.layers == ["body", "drop", "head", "head.pool", "head.out"]
    assert tl.finetune(m, cut=tl.LayerCut(at=0)).layers == ["body"]
    np.testing.assert_allclose(ft.features(x), np.asarray(nnx.relu(net.body(x))), rtol=1e-5, atol=1e-6)
    assert ft.predict(x).shape == (5, 2)
    # negative control: without a known input shape the order is the definition's, and the same cut
    # keeps the classifier and drops the layer the module calls first
    unknown = tl.wrap(net, input_shape=(None,))
    assert unknown.layers == ["fc", "drop", "body"]
    wrong = tl.finetune(unknown, cut=tl.LayerCut(drop_last=1))
    with pytest.raises(tl.CutError, match="'body' was removed by the cut"):
        wrong.predict(x)
