"""Conformance: inputs of any structure (a dict of named arrays with integer token ids and an
attention mask) and the heads' pools on token features, against numpy (``tlcore.head.pool_reference``).
"""
from __future__ import annotations

import numpy as np

import tlcore as tl
from tlcore.head import POOLS, pool_reference

from ._kit import check

N, T = 10, 6


def token_batch(n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids in [1, 20) and an attention mask that keeps a different prefix of each row."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None, :] < rng.integers(1, T + 1, size=(n, 1))).astype(np.int64)
    return {"input_ids": rng.integers(1, 20, size=(n, T)), "attention_mask": mask}


def tokens_model(backend: str) -> tl.Model:
    model = tl.get_backend(backend).reference_model(seed=0, variant="tokens")
    assert model.layers[:2] == ["embed", "proj"], model.layers
    return model


@check
def check_token_ids_stay_integers_and_dict_inputs_train(backend):
    base = tokens_model(backend)
    x = token_batch()
    out = base.predict(x)
    assert out.shape == (N, T, 8)
    ft = tl.finetune(base, cut=tl.LayerCut(at="proj"), head=tl.Head.linear(3, pool="mean"),
                     freeze=tl.FreezePolicy.up_to("embed"))
    snap = tl.snapshot(ft.build(x))
    y = np.arange(N) % 3
    hist = ft.fit(x, y, epochs=3, batch_size=4, optimizer=tl.optim.Adam(lr=0.05), progress=False)
    assert np.isfinite(hist["loss"]).all()
    tl.assert_frozen(snap, ft)
    changed = tl.changed_tensors(snap, ft.state())
    assert any(n.startswith("proj.") for n in changed) and any(n.startswith("head.") for n in changed)
    np.testing.assert_allclose(ft.predict({k: v[:3] for k, v in x.items()}), ft.predict(x)[:3], rtol=1e-5, atol=1e-6)


@check(cases={pool: {"pool": pool} for pool in POOLS if pool != "flatten"})
def check_token_pool_matches_numpy(backend, pool):
    base = tokens_model(backend)
    x = token_batch()
    tokens = base.predict(x)
    ft = tl.finetune(base, head=tl.Head.linear(3, pool=pool))
    expected = pool_reference(tokens, pool, x["attention_mask"])
    np.testing.assert_allclose(ft.features(x), expected, rtol=1e-5, atol=1e-5)
    state = ft.state()
    logits = expected @ state["head.out.weight"].T.astype(np.float64) + state["head.out.bias"]
    np.testing.assert_allclose(ft.predict(x), logits, rtol=1e-4, atol=1e-5)
    if pool in ("mean", "max", "last"):  # negative control: the mask changes what these pools see
        assert not np.allclose(expected, pool_reference(tokens, pool, None))
