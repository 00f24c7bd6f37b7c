"""H2O's scores summed in the forward (``Method.scores_in_forward``): the same compression as scoring the captured
queries afterwards, without holding every layer's prompt queries (32 GiB at 131K on the 8B shape).

Reference: ``SCBENCH_SCORE_IN_FORWARD=0``, the queries kept until the compression and scored there.
"""
import pytest
import torch

from scbench.engines import attention
from scbench.engines.hf import HFEngine
from scbench.methods.h2o import H2O
from support import byte_tokenizer, random_llama


def engine(chunk=None, device="cpu", dtype="float32", layers=3):
    model = random_llama(300, layers=layers, hidden=128, heads=4, kv_heads=2).to(device)
    return HFEngine(path="unused", model=model, tokenizer=byte_tokenizer(), dtype=dtype, prefill_chunk=chunk)


def prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 290, (n,), generator=g).tolist()


def compress_inputs(monkeypatch, method):
    """Every compression call's queries: (numel, scores carried or None)."""
    seen = []
    orig = H2O.compress_cache

    def spy(self, layer_idx, keys, values, queries):
        seen.append((layer_idx, queries.numel(), getattr(queries, "scbench_scores", None)))
        return orig(self, layer_idx, keys, values, queries)

    monkeypatch.setattr(H2O, "compress_cache", spy)
    return seen


def run(eng, monkeypatch, eager: bool, feeds=((200, 0),), **cfg):
    monkeypatch.setenv("SCBENCH_SCORE_IN_FORWARD", "1" if eager else "0")
    method = H2O(**{"budget": 48, **cfg})
    seen = compress_inputs(monkeypatch, method)
    s = eng.session(method)
    stats = [s.feed(prompt(n, seed), compress=True, sparse=False) for n, seed in feeds]
    state = [(layer.keys.clone(), layer.values.clone()) for layer in s.cache.layers]
    monkeypatch.undo()
    return s, stats, state, seen


@pytest.mark.parametrize("feeds", [((200, 0),), ((200, 0), (90, 1))], ids=["first", "later"])
def test_scores_in_the_forward_keep_what_the_captured_queries_keep(monkeypatch, feeds):
    """One prefill, and a later feed over a compressed cache: the kept keys and values are the same tensors, the
    compression sees no queries (only the scores), and its time counts the scoring done in the forward."""
    eng = engine()
    s0, st0, ref, seen0 = run(eng, monkeypatch, False, feeds)
    s1, st1, got, seen1 = run(eng, monkeypatch, True, feeds)
    for (k0, v0), (k1, v1) in zip(ref, got):
        assert k0.shape[-2] < 200 + 90 and torch.equal(k0, k1) and torch.equal(v0, v1)
    assert torch.equal(s0.last_logits, s1.last_logits)
    assert all(n > 0 and pre is None for _, n, pre in seen0)  # the reference: every prompt query kept
    assert len(seen1) == len(seen0) and all(n == 0 and pre is not None for _, n, pre in seen1)
    assert all(st.compress_s > 0 for st in st1)


def test_chunked_prefill_adds_the_chunks_scores(monkeypatch):
    """``model.prefill_chunk``: each chunk's queries are scored over the keys up to it and the sums add up to the
    whole prompt's scores (float32 rounding apart), so the same tokens are kept."""
    eng = engine(chunk=64)
    _, _, ref, _ = run(eng, monkeypatch, False)
    _, _, got, seen = run(eng, monkeypatch, True)
    for (k0, v0), (k1, v1) in zip(ref, got):
        torch.testing.assert_close(k1, k0, rtol=0, atol=0)
        torch.testing.assert_close(v1, v0, rtol=0, atol=0)
    assert all(pre is not None and pre.shape[-1] == 200 for _, _, pre in seen)


def test_scored_layers_hold_no_queries(monkeypatch):
    """While the forward runs, the context holds scores [B, Hkv, n], never a layer's queries."""
    monkeypatch.setenv("SCBENCH_SCORE_IN_FORWARD", "1")
    held = []
    orig = attention._score_layer

    def spy(ctx, layer, query, key, lse):
        orig(ctx, layer, query, key, lse)
        held.append((len(ctx.queries), {k: tuple(v.shape) for k, v in ctx.scores.items()}))

    monkeypatch.setattr(attention, "_score_layer", spy)
    s = engine().session(H2O(budget=48))
    s.feed(prompt(150), compress=True, sparse=False)
    assert [len(shapes) for _, shapes in held] == [1, 2, 3]
    assert all(n == 0 for n, _ in held) and held[-1][1][2] == (1, 2, 150)


@pytest.mark.parametrize("cfg", [{"obs_window": 32}, {}], ids=["obs_window", "env_off"])
def test_queries_are_kept_where_scores_cannot_be_summed_in_the_forward(monkeypatch, cfg):
    """An observation window (only the last queries vote) or ``SCBENCH_SCORE_IN_FORWARD=0``: the queries are
    captured as before."""
    eng = engine()
    _, _, _, seen = run(eng, monkeypatch, not cfg == {}, **cfg)
    assert seen and all(n > 0 and pre is None for _, n, pre in seen)


def test_scores_that_do_not_fit_the_keys_are_refused():
    keys = torch.randn(1, 2, 10, 8)
    marker = attention.scored_queries(torch.zeros(1, 2, 9))
    with pytest.raises(RuntimeError, match="layer 3: scores from the forward"):
        H2O(budget=4).score(3, keys, keys, marker)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_scores_in_the_forward_match_the_captured_queries(monkeypatch):
    """bf16 on CUDA (the Triton kernels, the first prefill's log-sum-exps from its forward): the same tokens kept."""
    eng = engine(device="cuda", dtype="bfloat16", layers=2)
    feeds = ((2000, 0), (300, 1))
    _, _, ref, _ = run(eng, monkeypatch, False, feeds, budget=256)
    _, _, got, seen = run(eng, monkeypatch, True, feeds, budget=256)
    for (k0, v0), (k1, v1) in zip(ref, got):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert all(n == 0 for _, n, _ in seen)
