"""A shared prefill whose group holds a method scoring from the forward's log-sum-exp (H2O, ``query_lse``) keeps
each captured query's log-sum-exp, whichever run computed it, and hands it on with the queries each run's
compression gets (scbench/engines/fork.py), so H2O in a grouped sweep does not recompute it. On CPU the forward has
no free log-sum-exp (``causal_attention_lse`` answers None): the tests put in an exact one."""
from __future__ import annotations

import torch

from scbench.engines import attention
from scbench.engines.fork import ForkSession, SharedPrefill
from scbench.kernels.dense import causal_attention
from scbench.methods.h2o import ALL_QUERIES
from scbench.run import build_method


def exact_lse(q, k, v, scale=None):
    """(causal_attention's output, the float32 log-sum-exp of each query's scaled causal scores)."""
    tq, tk = q.shape[-2], k.shape[-2]
    rep = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(rep, dim=1).float()
    s = (q.float() @ kk.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    return causal_attention(q, k, v, scale), s.masked_fill(~mask, float("-inf")).logsumexp(-1)


def feed_group(engine, methods, lse: bool, ids):
    shared = SharedPrefill(engine, takers=len(methods), window=ALL_QUERIES, lse=lse)
    got = []
    for name in methods:
        method = build_method({"name": name, "budget": 64} if name != "full" else {"name": "full"})
        session = ForkSession(engine, method, shared)
        seen = {}
        orig = method.compress_cache if "compress_cache" in method.hooks() else None
        if orig is not None:
            def spy(layer_idx, keys, values, queries, _orig=orig, _seen=seen):
                _seen[layer_idx] = getattr(queries, "scbench_lse", None)
                return _orig(layer_idx, keys, values, queries)
            method.compress_cache = spy
        session.feed(ids, compress=True, sparse=False)
        got.append(seen)
    return shared, got


def test_shared_prefill_carries_the_lse_to_h2o(tiny_engine, monkeypatch):
    monkeypatch.setattr(attention, "causal_attention_lse", exact_lse)
    ids = list(range(5, 205))
    # full attention computes the shared forward (it is first and does not ask for the log-sum-exp itself)
    shared, (_, seen) = feed_group(tiny_engine, ["full", "h2o"], True, ids)
    assert sorted(seen) == list(range(tiny_engine.num_layers))
    for layer, (lse, n) in seen.items():
        assert n == len(ids) and lse.shape == (1, tiny_engine.model.config.num_attention_heads, len(ids))
        assert torch.isfinite(lse).all()
    # what H2O got equals what its own forward attaches
    h2o = build_method({"name": "h2o", "budget": 64})
    ctx = attention.AttnContext(method=h2o, capture_queries=ALL_QUERIES)
    tiny_engine.session(h2o)._prefill(ids, ctx)
    own = {layer: q.scbench_lse for layer, q in ctx.queries.items()}
    for layer in seen:
        assert torch.allclose(seen[layer][0], own[layer][0], atol=1e-5) and seen[layer][1] == own[layer][1]


def test_no_lse_without_a_method_that_wants_it(tiny_engine, monkeypatch):
    monkeypatch.setattr(attention, "causal_attention_lse", exact_lse)
    shared, (_, seen) = feed_group(tiny_engine, ["full", "snapkv"], False, list(range(5, 205)))
    assert seen and all(v is None for v in seen.values())


def test_captured_queries_are_cut_once_the_longest_window_is_done(tiny_engine):
    """H2O wants every prompt query (at 131K on the 8B shape, 34 GB held beside the shared copy); once it has
    compressed, the shared prefill keeps only the last queries the runs still to fork want (SnapKV's window), and
    none once those are done; SnapKV still gets exactly the queries its own forward captures."""
    ids = list(range(5, 205))
    methods = [build_method(c) for c in ({"name": "h2o", "budget": 64}, {"name": "snapkv", "budget": 64},
                                          {"name": "full"})]
    windows = [m.query_window if "compress_cache" in m.hooks() else 0 for m in methods]
    shared = SharedPrefill(tiny_engine, takers=3, window=max(windows), lse=True, windows=windows)
    lengths = []
    seen = {}
    snap = methods[1]
    real = snap.compress_cache
    snap.compress_cache = lambda layer, k, v, q: (seen.__setitem__(layer, q.clone()), real(layer, k, v, q))[1]
    for method in methods:
        ForkSession(tiny_engine, method, shared).feed(ids, compress=True, sparse=False)
        lengths.append({q.shape[-2] for q in (shared.queries or {}).values()})
    assert lengths == [{snap.query_window}, set(), set()] and shared.lses == {}
    ctx = attention.AttnContext(method=snap, capture_queries=snap.query_window)
    tiny_engine.session(build_method({"name": "snapkv", "budget": 64}))._prefill(ids, ctx)
    assert sorted(seen) == sorted(ctx.queries)
    for layer, q in ctx.queries.items():
        assert torch.equal(seen[layer], q)


def test_every_query_window_is_handed_on_without_a_copy(tiny_engine):
    """The captured queries are stored contiguous, so the queries a fork's H2O gets (every prompt position) are the
    stored ones, not a copy: at 131K on the 8B shape a copy is 34 GB beside the fork's cache, and it ran a grouped
    sweep's second H2O run out of memory."""
    ids = list(range(5, 205))
    shared = SharedPrefill(tiny_engine, takers=2, window=ALL_QUERIES)  # one run still to fork: the queries stay
    ForkSession(tiny_engine, build_method({"name": "full"}), shared).feed(ids, compress=True, sparse=False)
    assert shared.queries and all(q.is_contiguous() for q in shared.queries.values())
    got = shared.shared_queries(ALL_QUERIES)
    assert all(got[layer].data_ptr() == q.data_ptr() for layer, q in shared.queries.items())
