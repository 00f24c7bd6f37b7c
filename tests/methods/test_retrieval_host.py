"""RetrievalAttention's host/accelerator split decode (methods/retrieval_host.py, scbench/kv/split.py) against the
loading path (split=false) and a float64 reference: greedy tokens, partial results and the device window."""
import pytest
import torch

from scbench.kernels.dense import reference_causal_attention
from scbench.kv.offload import TieredLayer
from scbench.kv.split import DeviceWindow, merge, partial_attention
from scbench.methods.retrieval_attention import RetrievalAttention
from scbench.methods.retrieval_host import host_partial

from support import make_tiny_engine, two_turn_decode


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gqa,top_k,n_init,n_local,n", [("head", 20, 4, 8, 100), ("group", 20, 0, 8, 100),
                                                        ("head", 200, 4, 8, 100), ("head", 20, 60, 50, 100)])
def test_split_partials_merge_to_attention_over_the_selected_rows(gqa, top_k, n_init, n_local, n):
    m = RetrievalAttention(top_k=top_k, n_init=n_init, n_local=n_local, gqa=gqa)
    q, k, v = rand(2, 6, 16, seed=1), rand(2, 2, n, 16, seed=2), rand(2, 2, n, 16, seed=3)
    layer = TieredLayer(k, v, storage="cpu")
    idx = m.select(q, k)
    idx = torch.arange(n).expand(2, 6, n) if idx is None else idx.repeat_interleave(6 // idx.shape[1], dim=1)
    gather = lambda t: t.repeat_interleave(3, dim=1).gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, 16))
    want = reference_causal_attention(q.unsqueeze(2).double(), gather(k).double(), gather(v).double(), 0.3)
    window = DeviceWindow(n_init, n_local)
    ks, vs = window.rows(layer)
    out_d, lse_d = partial_attention(q, ks, vs, 0.3)
    out_h, lse_h = host_partial(q, k, layer._v.buf, n_init, n - n_local, top_k, gqa == "group", 0.3)
    got = merge(out_d, lse_d, out_h, lse_h)
    torch.testing.assert_close(got, want[:, :, 0].float(), atol=1e-5, rtol=1e-5)


def test_device_window_follows_appends_crops_and_restores():
    n_init, n_local = 3, 5
    k, v = rand(1, 2, 12, 4, seed=4), rand(1, 2, 12, 4, seed=5)
    layer = TieredLayer(k, v, storage="cpu")
    layer.window = DeviceWindow(n_init, n_local)
    g = torch.Generator().manual_seed(6)
    snap = None
    for step in range(300):
        op = torch.randint(0, 10, (1,), generator=g).item()
        if op < 6:
            t = 1 if op < 5 else int(torch.randint(2, 9, (1,), generator=g))
            layer.update(rand(1, 2, t, 4, seed=step), rand(1, 2, t, 4, seed=step + 1000))
        elif op < 8:
            layer.scbench_crop(max(0, layer.n - int(torch.randint(0, 9, (1,), generator=g))))
        elif op == 8:
            snap = layer.scbench_snapshot()
        elif snap is not None:
            layer.scbench_restore(snap)
        n = layer.n
        ks, vs = layer.window.rows(layer)
        rows = list(range(min(n_init, n))) + list(range(max(n_init, n - n_local), n))
        assert torch.equal(ks, layer.keys[..., rows, :]) and torch.equal(vs, layer.values[..., rows, :]), step


@pytest.mark.parametrize("gqa,top_k,n_init,n_local", [("head", 64, 8, 32), ("group", 48, 0, 16), ("head", 4096, 4, 8),
                                                      ("head", 16, 300, 50)])
def test_split_decode_equals_the_loading_path(smol_tokenizer, gqa, top_k, n_init, n_local):
    engine = make_tiny_engine(smol_tokenizer, layers=2)
    g = torch.Generator().manual_seed(top_k + n_init)
    prompt = torch.randint(5, 2000, (290,), generator=g).tolist()
    follow = torch.randint(5, 2000, (17,), generator=g).tolist()
    cfg = dict(top_k=top_k, n_init=n_init, n_local=n_local, gqa=gqa)
    plain, _, _, _ = two_turn_decode(engine, RetrievalAttention(**cfg, split=False), prompt, follow)
    m = RetrievalAttention(**cfg)
    assert m.uses_split()
    split, _, _, mem = two_turn_decode(engine, m, prompt, follow)
    assert split == plain
    steps, layers, hq, hkv, d = len(split[0]) - 1, 2, 4, 2, 16
    assert mem["loaded_bytes"] == steps * layers * (hq * d * 4 + hq * (d + 1) * 4 + 2 * hkv * d * 4)


def test_faiss_and_recall_take_the_loading_path():
    assert not RetrievalAttention(recall=True).uses_split()
    assert not RetrievalAttention(split=False).uses_split()
    assert not RetrievalAttention(tier="device").uses_split()


@pytest.mark.parametrize("shape,k", [((3, 20000), 500), ((2, 2, 40000), 4096), ((4, 17000), 4000), ((2, 100), 7)])
@pytest.mark.parametrize("bound", [True, False])
def test_topk_rows_is_the_topk_set(shape, k, bound, monkeypatch):
    from scbench.methods import retrieval_search
    from scbench.methods.retrieval_search import topk_rows

    monkeypatch.setattr(retrieval_search, "BOUND", bound)

    s = rand(*shape, seed=k)
    if len(shape) == 2 and shape[1] > 10000:  # a sorted row: the strided sample misjudges nothing, still exact
        s[0] = torch.arange(shape[1], dtype=torch.float32)
    got = topk_rows(s, k)
    want = s.topk(k, dim=-1).indices
    assert got.shape == want.shape
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    spiky = torch.zeros(shape)  # ties everywhere: fewer than k rows above the sample's bound -> plain topk
    spiky[..., :: 97] = 1.0
    assert torch.equal(spiky.gather(-1, topk_rows(spiky, k)).sort(-1).values,
                       spiky.topk(k, dim=-1).values.sort(-1).values)


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_search_equals_the_float32_search(group, dtype):
    n, lo, hi, k = 20000, 16, 19900, 700
    q = rand(2, 6, 32, seed=7).to(dtype).float()  # the model's own query: exact in the keys' dtype
    kbuf = rand(2, 2, n + 50, 32, seed=8).to(dtype)  # a buffer with spare rows
    vbuf = rand(2, 2, n + 50, 32, seed=9).to(dtype)
    want = host_partial(q, kbuf.float(), vbuf, lo, hi, k, group, 0.2)
    got = host_partial(q, kbuf, vbuf, lo, hi, k, group, 0.2)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)  # P @ V rounds its output to the values' dtype
    from scbench.methods.retrieval_search import half_search

    idx, sel = half_search(q, kbuf, lo, hi, k, group)
    s = (q.double().view(2, 2, 3, 32) @ kbuf[..., lo:hi, :].double().transpose(-1, -2))  # [2, 2, 3, m]
    best = (s.amax(2) if group else s).topk(k, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, best.sort(-1).values)
    rows = idx.unsqueeze(2).expand(2, 2, 3, k) if group else idx
    torch.testing.assert_close(sel.double(), s.gather(-1, rows), atol=1e-4, rtol=1e-5)
    short = host_partial(q, kbuf, vbuf, lo, lo + 500, k, group, 0.2)  # fewer rows than k: all of them
    torch.testing.assert_close(short, host_partial(q, kbuf.float(), vbuf, lo, lo + 500, k, group, 0.2),
                               atol=2e-3, rtol=1e-2)


def test_bf16_half_search_agrees_with_the_float32_copy(smol_tokenizer):
    """bfloat16 on the CPU: searching the stored keys in place (search=half) picks the float32 copy's top-k sets, so
    the greedy tokens agree with it and with the loading path (up to the rounding of the two summation orders)."""
    from scbench.engines.hf import HFEngine
    from support import random_llama

    tok = smol_tokenizer
    model = random_llama(len(tok), layers=2, seed=0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    engine = HFEngine("t", name="t", model=model, tokenizer=tok, device="cpu", dtype="bfloat16")
    prompt = torch.randint(5, 2000, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    out = {}
    for name, kw in [("old", dict(split=False)), ("f32", {}), ("half", dict(search="half"))]:
        s = engine.session(RetrievalAttention(top_k=256, n_init=8, n_local=32, **kw))
        s.feed(prompt, compress=True, sparse=False)
        out[name] = s.generate(12).tokens
        if name == "half":
            assert "index" not in s.cache.layers[0].state  # no float32 copy
    assert out["half"][:10] == out["f32"][:10] == out["old"][:10]
