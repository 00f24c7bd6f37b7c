"""H2O's blockwise score kernels (scbench/kernels/h2o_scores.py) against the chunked torch reference: on CPU tensors
through Triton's interpreter (skipped without Triton), and on CUDA (skipped without it), including the dense
forward's log-sum-exp handed to the column-sum pass (scbench/kernels/dense.causal_attention_lse)."""
import os
import subprocess
import sys

import pytest
import torch

from scbench.kernels import dense, h2o_scores
from scbench.methods.h2o import H2O, accumulated_attention
from scbench.registry import METHODS

from support import triton_interpreting

cuda = pytest.mark.skipif(not torch.cuda.is_available() or h2o_scores.triton is None, reason="needs CUDA and Triton")


def causal_lse(keys, queries):
    """Each query's natural log-sum-exp over its causal scores (queries at the last positions), float32."""
    n, w, d = keys.shape[-2], queries.shape[-2], keys.shape[-1]
    k = keys.float().repeat_interleave(queries.shape[1] // keys.shape[1], 1)
    s = queries.float() @ k.transpose(-1, -2) * d**-0.5
    s.masked_fill_(torch.arange(n, device=keys.device) > (n - w + torch.arange(w, device=keys.device))[:, None],
                   float("-inf"))
    return s.logsumexp(-1)


@pytest.mark.skipif(h2o_scores.triton is None, reason="needs Triton (its interpreter runs the kernels on CPU)")
def test_interpreter_run():
    """The interpreted tests below, in a process started with TRITON_INTERPRET=1 (CPU tensors, tiny shapes)."""
    if triton_interpreting():
        pytest.skip("already interpreting: the tests below run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    safe = ["-P"] if sys.flags.safe_path else []  # a run of the installed package (-P) stays one in the child
    run = subprocess.run([sys.executable, *safe, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "interpreted",
                          __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


@pytest.mark.parametrize("n,w,hq,hkv", [(100, 70, 4, 2), (130, 130, 4, 4), (200, 33, 8, 2)])
@pytest.mark.parametrize("given_lse", [False, True])
def test_interpreted_scores_match_reference(interpreted, n, w, hq, hkv, given_lse):
    torch.manual_seed(n + w)
    keys, queries = torch.randn(1, hkv, n, 16), torch.randn(1, hq, w, 16)
    lse = causal_lse(keys, queries) if given_lse else None
    tiles = dict(BM=16, BN=32, num_warps=4, num_stages=2)  # several diagonal and below-diagonal blocks
    got = h2o_scores.accumulated_attention_triton(keys, queries, lse=lse, config=tiles)
    torch.testing.assert_close(got, accumulated_attention(keys, queries), atol=1e-5, rtol=1e-5)


def test_interpreted_bad_lse_shape_is_refused(interpreted):
    keys, queries = torch.randn(1, 2, 40, 16), torch.randn(1, 4, 40, 16)
    with pytest.raises(ValueError, match="lse"):
        h2o_scores.accumulated_attention_triton(keys, queries, lse=torch.zeros(1, 4, 39))


def test_lse_free_only_on_cuda():
    q, k = torch.randn(1, 4, 20, 16), torch.randn(1, 2, 20, 16)
    out, lse = dense.causal_attention_lse(q, k, k)
    assert lse is None
    torch.testing.assert_close(out, dense.causal_attention(q, k, k))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,w,hq,hkv", [(2085, 2085, 8, 2), (3000, 301, 32, 8), (130, 130, 4, 4)])
def test_blockwise_scores_match_reference(dtype, n, w, hq, hkv):
    torch.manual_seed(n + w)
    keys = torch.randn(1, hkv, n, 128, device="cuda", dtype=dtype)
    queries = torch.randn(1, hq, w, 128, device="cuda", dtype=dtype)
    got = h2o_scores.accumulated_attention_triton(keys, queries)
    want = accumulated_attention(keys.float(), queries.float())
    assert got.shape == want.shape == (1, hkv, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(got.sum(-1), torch.full_like(got.sum(-1), w * hq / hkv), rtol=1e-3, atol=1e-3)


@cuda
@pytest.mark.parametrize("n,hq,hkv", [(2085, 32, 8), (130, 4, 4)])
def test_forward_lse_scores_match_reference(n, hq, hkv):
    """The first prefill: the flash forward's log-sum-exp, then the column sums; through H2O.score as the engine
    hands it the captured queries."""
    torch.manual_seed(n)
    q = torch.randn(1, hq, n, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, hkv, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = dense.causal_attention_lse(q, k, v)
    assert lse is not None and lse.shape == (1, hq, n)
    torch.testing.assert_close(lse, causal_lse(k, q), atol=2e-2, rtol=1e-3)
    torch.testing.assert_close(out, dense.causal_attention(q, k, v), atol=2e-2, rtol=2e-2)
    q.scbench_lse = (lse, n)
    got = H2O(budget=64).score(0, k, v, q)
    want = accumulated_attention(k.float(), q.float())
    torch.testing.assert_close(got, want, atol=2e-1, rtol=2e-2)
    torch.testing.assert_close(got.sum(-1), torch.full_like(got.sum(-1), n * hq / hkv), rtol=1e-3, atol=1e-3)


def test_attention_attaches_the_forward_lse_to_the_captured_queries(monkeypatch):
    """scbench_attention hands a ``query_lse`` method the forward's log-sum-exp on its captured queries (the last
    ``capture_queries`` rows, with the key length); CPU: a stand-in forward returns the reference log-sum-exp."""
    from scbench.engines import attention

    calls = []

    def fake(q, k, v, scale):
        calls.append(q.shape[-2])
        return dense.causal_attention(q, k, v, scale), causal_lse(k, q)

    monkeypatch.setattr(attention, "causal_attention_lse", fake)
    module = type("Attn", (), {"layer_idx": 3})()
    q, k = torch.randn(1, 4, 50, 16), torch.randn(1, 2, 50, 16)
    ctx = attention.AttnContext(method=H2O(budget=8, obs_window=20), capture_queries=20)
    with attention.active(ctx):
        out, _ = attention.scbench_attention(module, q, k, k, None, scaling=16**-0.5)
    lse, n = ctx.queries[3].scbench_lse
    assert calls == [50] and n == 50
    torch.testing.assert_close(lse, causal_lse(k, q)[:, :, -20:])
    torch.testing.assert_close(out.transpose(1, 2), dense.causal_attention(q, k, k))
    # methods that do not ask, and decode steps, keep the plain path
    ctx = attention.AttnContext(method=METHODS.get("snapkv")(budget=8), capture_queries=20)
    with attention.active(ctx):
        attention.scbench_attention(module, q, k, k, None, scaling=16**-0.5)
    assert calls == [50] and not hasattr(ctx.queries[3], "scbench_lse")


# KVzip: the same passes with a maximum (methods/reconstruction.py)
KVZIP_CASES = [(3, 2, 23, 120, 4, 10, 90), (2, 4, 40, 100, 0, 0, 100), (1, 2, 37, 70, 8, 3, 40)]


@pytest.mark.parametrize("nh,g,r,n,sink,start,end", KVZIP_CASES)
def test_interpreted_kvzip_max_scores_match_torch(interpreted, nh, g, r, n, sink, start, end):
    """The fused max pass equals the torch blocks (float32) and keeps the same top pairs."""
    from scbench.methods import reconstruction as rec

    gen = torch.Generator().manual_seed(n + r)
    q, k = torch.randn(nh, g, r, 16, generator=gen), torch.randn(nh, n + r, 16, generator=gen)
    want = rec.layer_scores(q, k, sink, start, end, kernel=False)
    got = rec.layer_scores(q, k, sink, start, end, kernel=True)
    assert got.shape == want.shape == (nh, end - start)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    budget = (end - start) // 3
    for h in range(nh):
        assert set(got[h].topk(budget).indices.tolist()) == set(want[h].topk(budget).indices.tolist())
        torch.testing.assert_close(got[h], rec.reference_chunk_scores(q[h], k[h], sink, start, end), atol=1e-6,
                                   rtol=1e-5)


def test_interpreted_kvzip_ragged_heads_and_sessions_match_torch(interpreted, monkeypatch):
    """Whole reconstruction scoring on a tiny engine (dense layers, then ragged heads after a first firing): the
    fused passes give the torch scores."""
    from scbench.methods import reconstruction as rec
    from support import byte_tokenizer, make_tiny_engine

    engine = make_tiny_engine(byte_tokenizer())
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    session = engine.session(METHODS.get("kvzip")(budget=40, chunk=128))
    session.feed(ids, compress=True, sparse=False)  # ragged layers from here
    more = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    session.feed(more, compress=False, sparse=False)
    runs, original = {}, rec.layer_scores
    for kernel in (False, True):
        def forced(q, k, sink, start, end, max_bytes=None, kernel=None, _k=kernel):
            return original(q, k, sink, start, end, max_bytes, _k)

        monkeypatch.setattr(rec, "layer_scores", forced)
        runs[kernel], _ = rec.reconstruction_scores(session, more, 64, 4)
    for i in runs[False]:
        for a, b in zip(runs[False][i], runs[True][i]):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    from scbench.methods.head_budgets import allocate

    flat = {kernel: [s for i in sorted(r) for s in r[i]] for kernel, r in runs.items()}
    total = sum(s.shape[0] for s in flat[False]) // 3  # the model-wide pool (level pair): the same kept pairs
    kept = {kernel: allocate(f, total) for kernel, f in flat.items()}
    assert all(torch.equal(a, b) for a, b in zip(kept[False], kept[True]))


@cuda
@pytest.mark.parametrize("nh,g,r,n", [(8, 4, 2075, 6000), (1, 4, 300, 1000)])
def test_kvzip_max_scores_cuda_match_torch(nh, g, r, n):
    """bf16 cache on CUDA: the fused passes against the float32 torch blocks; the top pairs agree but for
    near-ties (bf16 products summed in another order)."""
    from scbench.methods import reconstruction as rec

    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(nh, g, r, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(nh, n + r, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    start, end = 100, 100 + min(2048, n - 100)
    want = rec.layer_scores(q, k, 4, start, end, kernel=False)
    got = rec.layer_scores(q, k, 4, start, end, kernel=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    budget = (end - start) // 4
    for h in range(nh):
        a, b = set(got[h].topk(budget).indices.tolist()), set(want[h].topk(budget).indices.tolist())
        assert len(a ^ b) <= 2 * max(1, budget // 500), (h, len(a ^ b))
