"""Quest's captured-step decode (methods/quest_fast.py, scbench/kernels/paged_decode.py) against the plain loop:
paged attention against a float64 reference, and greedy tokens, loaded bytes and the cache left behind equal to
the plain path's on a tiny random Llama (float32, CPU). The Triton kernel is compared on CUDA only."""
import pytest
import torch

from scbench.engines import attention, fastdecode
from scbench.kernels import paged_decode, quest_scores
from scbench.methods.quest import Quest

from support import make_tiny_engine, quest_bounds_after, two_turn_decode


def _case(seed, b=1, hq=8, hkv=2, hs=8, c=512, d=32, m=9, page=16, n=300, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g).to(device, dtype)
    k, v = (torch.randn(b, hkv, c, d, generator=g).to(device, dtype) for _ in range(2))
    pages = torch.randint(0, (n + page - 1) // page, (b, hs, m), generator=g)
    pages[..., 1] = -1  # unused slots
    pages[..., -1] = (n - 1) // page  # the page being filled: rows past n do not count
    return q, k, v, pages.to(device), torch.tensor([n], device=device)


def _reference(q, k, v, pages, n, page, scale):
    b, hq, _, d = q.shape
    hkv, hs = k.shape[1], pages.shape[1]
    out = torch.empty(b, hq, 1, d, dtype=torch.float64)
    for i in range(b):
        for h in range(hq):
            sel = pages[i, h // (hq // hs)].tolist()
            rows = [pg * page + r for pg in sel if pg >= 0 for r in range(page) if pg * page + r < int(n)]
            kh, vh = k[i, h // (hq // hkv), rows].double(), v[i, h // (hq // hkv), rows].double()
            w = (kh @ q[i, h, 0].double() * scale).softmax(0)
            out[i, h, 0] = w @ vh
    return out


@pytest.mark.parametrize("hs", [8, 2])
def test_paged_attention_torch_matches_reference(hs):
    q, k, v, pages, n = _case(hs, hs=hs)
    got = paged_decode.paged_attention_torch(q, k, v, pages, n, 16, 0.2)
    torch.testing.assert_close(got.double(), _reference(q, k, v, pages, n, 16, 0.2), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or paged_decode.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hs,m,c,n", [(32, 257, 8192, 8000), (8, 257, 8192, 5000), (32, 3, 512, 40)])
def test_paged_attention_triton_matches_torch(dtype, hs, m, c, n):
    q, k, v, pages, nn = _case(m, hq=32, hkv=8, hs=hs, c=c, d=128, m=m, n=n, device="cuda", dtype=dtype)
    got = paged_decode.paged_attention_triton(q, k, v, pages, nn, 16, 0.09)
    want = _reference(q.cpu(), k.cpu(), v.cpu(), pages.cpu(), nn.cpu(), 16, 0.09)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("gqa,budget,recent,dense", [("head", 64, 1, 1), ("group", 48, 2, 0), ("head", 4096, 1, 1),
                                                     ("head", 72, 1, 0)])
def test_fast_quest_equals_plain(smol_tokenizer, gqa, budget, recent, dense):
    engine = make_tiny_engine(smol_tokenizer, layers=3)
    g = torch.Generator().manual_seed(budget)
    prompt = torch.randint(5, 2000, (333,), generator=g).tolist()
    follow = torch.randint(5, 2000, (21,), generator=g).tolist()
    cfg = dict(budget=budget, page_size=16, recent_pages=recent, dense_layers=dense, gqa=gqa)
    plain, ppath, ps, _ = two_turn_decode(engine, Quest(**cfg), prompt, follow, "plain", 24, 17)
    pmem = ps.memory()
    fast, fpath, fs, _ = two_turn_decode(engine, Quest(**cfg), prompt, follow, "fast", 24, 17)
    fmem = fs.memory()
    assert ppath == ["plain"] * 2 and fpath == ["static"] * 2
    assert fast == plain
    assert fmem["kv_bytes"] == pmem["kv_bytes"]
    assert [layer.n for layer in fs.cache.layers] == [layer.n for layer in ps.cache.layers]
    for a, b in zip(fs.cache.layers, ps.cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)


def test_loaded_bytes_match_plain(smol_tokenizer):
    engine = make_tiny_engine(smol_tokenizer, layers=3)
    prompt = torch.randint(5, 2000, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    got = []
    for mode in ("plain", "fast"):
        engine.decode_mode = mode
        s = engine.session(Quest(budget=64, page_size=16, dense_layers=1))
        s.feed(prompt, compress=True, sparse=False)
        s.generate(9)
        got.append(s.memory()["loaded_bytes"])
    engine.decode_mode = "auto"
    assert got[0] == got[1] > 0


def test_plugin_declines_host_tier_and_recall(smol_tokenizer):
    engine = make_tiny_engine(smol_tokenizer)
    s = engine.session(Quest())
    s.feed([5, 6, 7] * 40, compress=False, sparse=False)  # no compression: plain layers, not TieredLayers
    assert "not a TieredLayer" in fastdecode.unsupported(s.cache, s.method)
    assert Quest(recall=True).static_decoder() is None
    assert "fast_decode = False" in fastdecode.unsupported(s.cache, Quest(recall=True))


@pytest.mark.skipif(not torch.cuda.is_available() or paged_decode.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,at", [(False, 5000), (True, 4111), (False, 16)])
def test_fused_quest_kernels_match_torch(dtype, group, at):
    """Bounds update + scores kernel and the top-k paged attention against the torch-ops page list path."""
    from scbench.methods.quest import page_scores

    torch.manual_seed(at)
    c, p, hq, hkv, d = 8192, 16, 32, 8, 128
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, hkv, c, d, device="cuda", dtype=dtype) for _ in range(2))
    kmin, kmax = (torch.randn(1, hkv, c // p, d, device="cuda", dtype=dtype) for _ in range(2))
    atv = torch.tensor([at], device="cuda")
    lo, hi = quest_bounds_after(kmin, kmax, k, at, p)  # torch reference of the update
    s = quest_scores.quest_scores_triton(q, k, kmin, kmax, atv, p, 1, group)
    assert torch.equal(kmin, lo) and torch.equal(kmax, hi)
    want = page_scores(q[:, :, 0], lo, hi)
    if group:
        want = want.reshape(1, hkv, -1, c // p).amax(2)
    cand = max(0, at // p)
    torch.testing.assert_close(s[..., :cand], want[..., :cand], atol=1e-3, rtol=1e-3)
    assert torch.isinf(s[..., cand:]).all()
    top = s.topk(min(c // p, (1024 - 1) // p), dim=-1)
    pages = quest_scores.quest_page_list(top.values, top.indices, atv + 1, p, 1024, 1)
    ref = paged_decode.paged_attention_torch(q, k, v, pages, atv + 1, p, 0.09)
    got = paged_decode.paged_attention_triton(q, k, v, top.indices, atv + 1, p, 0.09, top_values=top.values,
                                              budget=1024, recent=1)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


def test_turns_reuse_static_buffers_and_bounds(smol_tokenizer, monkeypatch):
    """From the first decode the static buffers are the layers' storage (no turn copies a row) and the layers'
    bounds are views of the plugin's; after a rollback and a follow-up both equal the bounds recomputed from the
    keys, and the plugin redoes only the pages past the crop."""
    from scbench.methods import quest_fast
    from scbench.methods.quest import page_bounds

    engine = make_tiny_engine(smol_tokenizer, layers=3)
    g = torch.Generator().manual_seed(5)
    prompt, follow = (torch.randint(5, 2000, (t,), generator=g).tolist() for t in (333, 21))
    copied = []
    real = quest_fast.QuestDecode.load
    monkeypatch.setattr(quest_fast.QuestDecode, "load", lambda self, kv, cache: (
        copied.append([layer.keys.data_ptr() != kb.data_ptr() for layer, kb in zip(cache.layers, kv.k)]),
        real(self, kv, cache))[1])
    _, paths, s, _ = two_turn_decode(engine, Quest(budget=64, page_size=16, dense_layers=1), prompt, follow, "fast", 24, 17)
    assert paths == ["static"] * 2
    # the layers moved into the static buffers when they were made (no second copy of the cache for the first
    # decode), and the second turn's rows were already there
    assert copied == [[False] * 3, [False] * 3]
    plug = s.decoder.plugin
    for l, layer in enumerate(s.cache.layers):
        assert layer.keys.data_ptr() == s.decoder.kv.k[l].data_ptr()
        if l == 0:
            continue
        lo, hi = page_bounds(layer.keys, 16)
        assert torch.equal(layer.state["quest"][0], lo) and torch.equal(layer.state["quest"][1], hi)
        assert layer.state["quest"][0].data_ptr() == plug.kmin[l].data_ptr()
        assert torch.equal(plug.kmin[l][:, :, : lo.shape[2]], lo) and torch.equal(plug.kmax[l][:, :, : hi.shape[2]], hi)


@pytest.mark.skipif(not torch.cuda.is_available() or paged_decode.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("radix,merge,segment", [(2, False, None), (2, True, 128), (0, True, 128)])
def test_select_variants_and_union_kernel_cuda(dtype, radix, merge, segment):
    """Llama-8B head shapes: the select variants list the bisection's pages, and the union kernel (from the page
    maps) matches the torch reference over those lists."""
    from scbench.kernels import paged_union, quest_select

    torch.manual_seed(radix)
    c, p, hq, hkv, d, at = 8192, 16, 32, 8, 128, 5000
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, hkv, c, d, device="cuda", dtype=dtype) for _ in range(2))
    kmin, kmax = (torch.randn(1, hkv, c // p, d, device="cuda", dtype=dtype) for _ in range(2))
    atv = torch.tensor([at], device="cuda")
    s = quest_scores.quest_scores_triton(q, k, kmin, kmax, atv, p, 1, False)
    kk = (1024 - 1) // p
    want = quest_select.quest_select_triton(s, atv + 1, p, 1024, 1, kk)
    mp = torch.empty(s.shape, dtype=torch.int8, device="cuda")
    got = quest_select.quest_select_triton(s, atv + 1, p, 1024, 1, kk, radix=radix, map_out=mp, segment=segment,
                                           local_warps=1)
    assert torch.equal(got, want)
    ref = paged_decode.paged_attention_torch(q, k, v, want, atv + 1, p, 0.09)
    counter = torch.zeros(64, dtype=torch.int32, device="cuda") if merge else None
    out = paged_union.paged_union_triton(q, k, v, mp, atv + 1, p, 0.09, counter=counter)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available() or paged_decode.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_dot_kernel_cuda(dtype):
    """The matmul paged kernel (pipelined, in-kernel merge) against the float64 reference at Llama-8B head shapes."""
    from scbench.kernels import paged_dot

    q, k, v, pages, nn = _case(3, hq=32, hkv=8, hs=32, c=8192, d=128, m=257, n=8000, device="cuda", dtype=dtype)
    counter = torch.zeros(64, dtype=torch.int32, device="cuda")
    got = paged_dot.paged_dot_triton(q, k, v, pages, nn, 16, 0.09, counter=counter)
    want = _reference(q.cpu(), k.cpu(), v.cpu(), pages.cpu(), nn.cpu(), 16, 0.09)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu().double(), want, atol=tol, rtol=tol)
    assert not counter.any()
