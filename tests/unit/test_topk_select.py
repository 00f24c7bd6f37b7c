"""The sort-free top-k kernels (scbench/kernels/topk_select.py, quest_select.py) against torch.topk on random
scores. They run on CUDA, or on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``); skipped without
Triton."""
import os

import pytest
import torch

from scbench.kernels import paged_decode, paged_union, quest_scores, quest_select, topk_select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(topk_select.triton is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
                                reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")


@pytest.mark.parametrize("segment,radix", [(None, 0), (16, 0), (None, 1), (16, 1), (None, 2), (16, 2)])
@pytest.mark.parametrize("p,n,budget,recent,page", [(40, 600, 128, 1, 16), (40, 600, 136, 2, 16), (20, 100, 512, 1, 8),
                                                    (33, 520, 64, 3, 16), (40, 640, 16, 1, 16)])
def test_quest_select_matches_topk(p, n, budget, recent, page, segment, radix):
    g = torch.Generator().manual_seed(p + n + budget)
    s = torch.randn(2, 3, p, generator=g).to(DEVICE)
    s[0, 1, :5] = 0.25  # ties at the threshold
    nn = torch.tensor([n], device=DEVICE)
    cand = max(0, (n - 1) // page - recent + 1)
    s[..., cand:] = float("-inf")
    k = min(p, (budget - 1) // page)
    top = s.topk(k, dim=-1)
    want = quest_scores.quest_page_list(top.values, top.indices, nn, page, budget, recent)
    got = quest_select.quest_select_triton(s, nn, page, budget, recent, k, segment=segment, radix=radix)
    assert got.shape == want.shape
    assert torch.equal(got[..., k:].long().cpu(), want[..., k:].cpu())  # the recent pages
    g_sel, w_sel = got[..., :k].long().cpu(), want[..., :k].cpu()
    assert torch.equal((g_sel >= 0).sum(-1), (w_sel >= 0).sum(-1))
    assert torch.equal(g_sel.sort(-1).values, w_sel.sort(-1).values) or _tie_ok(s.cpu(), g_sel, w_sel)
    assert torch.equal(g_sel, torch.where(g_sel >= 0, g_sel, 1 << 30).sort(-1).values.where(g_sel >= 0, -1))  # ascending


def test_quest_select_variants_agree_on_hard_rows():
    """Bisection, radix histograms and the interpolating search list the same pages (ties: lowest positions) on
    rows made to defeat a search: all equal, few distinct values, magnitudes over 60 decades, negatives only."""
    g = torch.Generator().manual_seed(3)
    p, n, page, budget = 200, 3300, 16, 1200
    rows = [torch.full((p,), 1.5), torch.randint(0, 4, (p,), generator=g).float(),
            torch.randn(p, generator=g).sign() * 10 ** (torch.rand(p, generator=g) * 60 - 30),
            -torch.rand(p, generator=g) - 1, torch.randn(p, generator=g) * 1e-30, torch.randn(p, generator=g)]
    s = torch.stack(rows).view(1, len(rows), p).to(DEVICE)
    s[..., (n - 1) // page :] = float("-inf")
    s[0, 5, 7:190:3] = float("-inf")  # scattered non-candidates
    nn = torch.tensor([n], device=DEVICE)
    k = (budget - 1) // page
    want = quest_select.quest_select_triton(s, nn, page, budget, 1, k).cpu()
    top = s.topk(k, dim=-1)
    ref = quest_scores.quest_page_list(top.values, top.indices, nn, page, budget, 1).cpu()
    assert _tie_ok(s.cpu(), want[..., :k], ref[..., :k])
    for radix in (1, 2):
        for segment in (None, 64):
            got = quest_select.quest_select_triton(s, nn, page, budget, 1, k, radix=radix, segment=segment).cpu()
            assert torch.equal(got, want), (radix, segment)


def test_radix_select_rejects_bad_digits():
    s = torch.zeros(1, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="digits"):
        topk_select.radix_select_triton(s, torch.tensor([60], device=DEVICE), 8, 0, 4, digits=(8, 8))


def _tie_ok(s, got, want):
    """Same multiset of selected scores (ties may pick other indices than topk)."""
    for i in range(s.shape[0]):
        for h in range(s.shape[1]):
            a = s[i, h][got[i, h][got[i, h] >= 0]].sort().values
            b = s[i, h][want[i, h][want[i, h] >= 0]].sort().values
            if not torch.equal(a, b):
                return False
    return True


def _radix_reference(s, n, k, n_init, n_local):
    c = s.shape[-1]
    pos = torch.arange(c)
    m = s.float().cpu().flatten(0, 1).masked_fill((pos < n_init) | (pos >= n - n_local), float("-inf"))
    top = m.topk(min(k, c), dim=-1)
    return torch.where(top.values > float("-inf"), top.indices, -1)


@pytest.mark.parametrize("c,n,k,n_init,n_local,dtype,digits", [(700, 650, 64, 8, 32, torch.float32, None),
                                                                (700, 650, 1000, 8, 32, torch.float32, None),
                                                                (300, 40, 16, 30, 20, torch.float32, None),
                                                                (5000, 4999, 300, 4, 16, torch.float32, (8, 8, 8, 8)),
                                                                (700, 700, 50, 0, 10, torch.bfloat16, None),
                                                                (700, 700, 50, 0, 10, torch.bfloat16, (11, 5)),
                                                                (900, 800, 90, 3, 10, torch.bfloat16, (11, 11, 10))])
def test_radix_select_matches_topk(c, n, k, n_init, n_local, dtype, digits):
    g = torch.Generator().manual_seed(c + k)
    s = (torch.randn(1, 3, c, generator=g) * 4).to(DEVICE, dtype)
    s[0, 0, 100:110] = -s[0, 0, 100:110].abs()  # negative scores and (bf16) ties
    nn = torch.tensor([n], device=DEVICE)
    got = topk_select.radix_select_triton(s, nn, k, n_init, n_local, chunk=256, digits=digits).long().cpu()
    want = _radix_reference(s, n, k, n_init, n_local)
    assert got.shape == (3, k)
    assert torch.equal((got >= 0).sum(-1), (want >= 0).sum(-1))
    for r in range(3):
        a, b = got[r][got[r] >= 0], want[r][want[r] >= 0]
        assert len(set(a.tolist())) == len(a)
        sf = s.float().cpu().view(3, c)[r]
        assert torch.equal(sf[a].sort().values, sf[b].sort().values)  # the same scores (ties: any index)
        if dtype == torch.float32:
            assert torch.equal(a.sort().values, b.sort().values)


@pytest.mark.parametrize("chunk", [256, 4096])
def test_radix_select_bf16_negative_tied_kth_keeps_every_row(chunk):
    """bfloat16 scores whose k-th largest is negative and tied: a negative score's 32-bit key has its low 16 bits
    set, so compared whole with the two passes' 16-bit k-th key every tie counted as larger: more than k rows were
    written, past the row's slots into the next row's static rows (on a real model its attention sinks; found by
    scripts/bench_agreement.py on SmolLM2 on the H200)."""
    g = torch.Generator().manual_seed(21)
    r, c, n, k, n_init, n_local = 3, 1200, 1100, 700, 16, 64
    s = ((torch.randn(1, r, c, generator=g) * 3).round() - 2).to(DEVICE, torch.bfloat16)  # kth < 0, many ties
    nn = torch.tensor([n], device=DEVICE)
    got = topk_select.radix_select_triton(s, nn, k, n_init, n_local, chunk=chunk, static=True).long().cpu()
    want = _radix_reference(s, n, k, n_init, n_local)
    assert float(s.float().cpu().view(r, c)[0, want[0]].min()) < 0  # the case this guards
    ns = n_init + n_local
    static = torch.cat([torch.arange(n_init), n - n_local + torch.arange(n_local)])
    sf = s.float().cpu().view(r, c)
    for i in range(r):
        assert torch.equal(got[i, :ns], static)  # not overwritten by the row before
        a = got[i, ns:]
        assert bool((a >= 0).all()) and a.unique().numel() == k
        assert bool(((a >= n_init) & (a < n - n_local)).all())
        assert torch.equal(sf[i, a].sort().values, sf[i, want[i]].sort().values)


@pytest.mark.parametrize("tune", [{}, {"pages_per_split": 4, "block_pages": 2, "num_warps": 2},
                                  {"pages_per_split": 4, "block_pages": 2, "rowwise": True}, {"merge": True}])
def test_quest_select_then_paged_kernel_matches_torch(tune):
    g = torch.Generator().manual_seed(7)
    b, hq, hkv, c, d, page, n, budget = 1, 4, 2, 512, 16, 16, 470, 128
    q = torch.randn(b, hq, 1, d, generator=g).to(DEVICE)
    k, v = (torch.randn(b, hkv, c, d, generator=g).to(DEVICE) for _ in range(2))
    s = torch.randn(b, hq, c // page, generator=g).to(DEVICE)
    s[..., (n - 1) // page :] = float("-inf")
    nn = torch.tensor([n], device=DEVICE)
    kk = (budget - 1) // page
    top = s.topk(kk, dim=-1)
    want = paged_decode.paged_attention_torch(q, k, v, quest_scores.quest_page_list(top.values, top.indices, nn, page,
                                                                                     budget, 1), nn, page, 0.3)
    pages = quest_select.quest_select_triton(s, nn, page, budget, 1, kk)
    tune = dict(tune)
    counter = torch.zeros(16, dtype=torch.int32, device=DEVICE) if tune.pop("merge", False) else None
    for _ in range(2):  # the in-kernel merge leaves its counter at zero for the next call
        got = paged_decode.paged_attention_triton(q, k, v, pages, nn, page, 0.3, counter=counter, **tune)
        torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)
    assert counter is None or not counter.any()


@pytest.mark.parametrize("range_pages,block_pages,merge,segment", [(None, None, False, None), (8, 1, False, 8),
                                                                    (4, 2, True, None)])
def test_quest_map_then_union_kernel_matches_torch(range_pages, block_pages, merge, segment):
    """The select kernel's page map and the union kernel (each page of a group's union read once, per-head masks)
    against the torch reference over the same page lists."""
    g = torch.Generator().manual_seed(11)
    b, hq, hkv, c, d, page, n, budget = 1, 8, 2, 512, 16, 16, 470, 128
    q = torch.randn(b, hq, 1, d, generator=g).to(DEVICE)
    k, v = (torch.randn(b, hkv, c, d, generator=g).to(DEVICE) for _ in range(2))
    s = torch.randn(b, hq, c // page, generator=g).to(DEVICE)
    s[:, 1] = s[:, 0]  # two heads of a group with the same pages: shared reads
    s[..., (n - 1) // page :] = float("-inf")
    nn = torch.tensor([n], device=DEVICE)
    kk = (budget - 1) // page
    mp = torch.full((b, hq, c // page), 7, dtype=torch.int8, device=DEVICE)
    pages = quest_select.quest_select_triton(s, nn, page, budget, 1, kk, radix=2, map_out=mp, segment=segment)
    listed = torch.zeros(b, hq, c // page, dtype=torch.int8)
    for h in range(hq):
        listed[0, h, [x for x in pages[0, h].tolist() if x >= 0]] = 1
    assert torch.equal(mp.cpu(), listed)
    want = paged_decode.paged_attention_torch(q, k, v, pages, nn, page, 0.3)
    counter = torch.zeros(4, dtype=torch.int32, device=DEVICE) if merge else None
    for _ in range(2):  # the in-kernel merge leaves its counter at zero for the next call
        got = paged_union.paged_union_triton(q, k, v, mp, nn, page, 0.3, range_pages=range_pages,
                                             block_pages=block_pages, counter=counter)
        torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)
    assert counter is None or not counter.any()


@pytest.mark.parametrize("tune", [{}, {"counter": True, "num_stages": 2}, {"block_pages": 1, "pages_per_split": 3}])
def test_paged_dot_kernel_matches_torch(tune):
    """The matmul paged kernel (one list per query head, -1 slots, a partial last page) against the torch path."""
    from scbench.kernels import paged_dot

    g = torch.Generator().manual_seed(19)
    b, hq, hkv, c, d, page, n = 1, 4, 2, 512, 16, 16, 470
    q = torch.randn(b, hq, 1, d, generator=g).to(DEVICE)
    k, v = (torch.randn(b, hkv, c, d, generator=g).to(DEVICE) for _ in range(2))
    pages = torch.randint(0, (n + page - 1) // page, (b, hq, 9), generator=g)
    pages[..., 2] = -1
    pages[..., -1] = (n - 1) // page
    pages = pages.to(DEVICE)
    nn = torch.tensor([n], device=DEVICE)
    want = paged_decode.paged_attention_torch(q, k, v, pages, nn, page, 0.3)
    tune = dict(tune)
    counter = torch.zeros(8, dtype=torch.int32, device=DEVICE) if tune.pop("counter", False) else None
    for _ in range(2):
        got = paged_dot.paged_dot_triton(q, k, v, pages, nn, page, 0.3, counter=counter, **tune)
        torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)
    assert counter is None or not counter.any()


def test_radix_rows_then_paged_kernel_matches_torch():
    g = torch.Generator().manual_seed(8)
    b, hq, hkv, c, d, n, k, n_init, n_local = 1, 4, 2, 600, 16, 590, 40, 8, 16
    q = torch.randn(b, hq, 1, d, generator=g).to(DEVICE)
    kb, vb = (torch.randn(b, hkv, c, d, generator=g).to(DEVICE) for _ in range(2))
    s = (q.reshape(b, hkv, 2, d) @ kb.transpose(-1, -2)).reshape(b, hq, c)
    nn = torch.tensor([n], device=DEVICE)
    ns = n_init + n_local
    rows = torch.empty(b * hq, ns + k, dtype=torch.int32, device=DEVICE)
    rows[:, :ns] = torch.cat([torch.arange(n_init), n - n_local + torch.arange(n_local)]).to(DEVICE, torch.int32)
    topk_select.radix_select_triton(s, nn, k, n_init, n_local, out=rows[:, ns:], chunk=128)
    want_rows = torch.cat([rows[:, :ns].long().cpu(), _radix_reference(s, n, k, n_init, n_local)], -1)
    want = paged_decode.paged_attention_torch(q.cpu(), kb.cpu(), vb.cpu(), want_rows.view(b, hq, -1), nn.cpu(), 1, 0.3)
    for rowwise in (False, True):
        got = paged_decode.paged_attention_triton(q, kb, vb, rows.view(b, hq, -1), nn, 1, 0.3, pages_per_split=32,
                                                  block_pages=16, rowwise=rowwise)
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [False, True])
def test_fused_scores_then_radix_select_match_torch(group):
    g = torch.Generator().manual_seed(9 + group)
    b, hq, hkv, c, d, n, k, n_init, n_local = 1, 4, 2, 300, 16, 290, 24, 4, 8
    q = torch.randn(b, hq, 1, d, generator=g).to(DEVICE)
    kb = torch.randn(b, hkv, c, d, generator=g).to(DEVICE)
    nn = torch.tensor([n], device=DEVICE)
    want_s = (q.reshape(b, hkv, 2, d) @ kb.transpose(-1, -2))
    want_s = want_s.amax(2) if group else want_s.flatten(1, 2)
    s, work = topk_select.retrieval_scores_triton(q, kb, nn, k, n_init, n_local, group, block=64)
    torch.testing.assert_close(s.cpu(), want_s.cpu(), atol=1e-4, rtol=1e-4)
    got = topk_select.radix_select_triton(s, nn, k, n_init, n_local, chunk=128, work=work).long().cpu()
    want = _radix_reference(want_s, n, k, n_init, n_local)
    for r in range(want.shape[0]):
        assert torch.equal(got[r].sort().values, want[r].sort().values)


@pytest.mark.parametrize("gqa,fused,at,n_init", [("head", True, 300, 4), ("group", True, 300, 4),
                                                ("head", False, 300, 4), ("head", True, 30, 20), ("group", True, 10, 20)])
def test_retrieval_plugin_radix_rows_match_torch_rows(gqa, fused, at, n_init):
    from types import SimpleNamespace

    from scbench.methods.retrieval_attention import RetrievalAttention
    from scbench.methods.retrieval_fast import RetrievalDecode

    g = torch.Generator().manual_seed(11)
    kb = torch.randn(1, 2, 320, 16, generator=g).to(DEVICE)
    q = torch.randn(1, 4, 1, 16, generator=g).to(DEVICE)
    kv = SimpleNamespace(k=[kb], at=torch.tensor([at], device=DEVICE))
    plugin = RetrievalDecode(RetrievalAttention(top_k=40, n_init=n_init, n_local=16, gqa=gqa, tier="device"))
    plugin.fused, plugin.radix, plugin.score_args = fused, {"chunk": 128}, {"block": 64}
    want = plugin.rows(SimpleNamespace(k=[kb.cpu()], at=kv.at.cpu()), 0, q.cpu())
    n = kv.at[:1] + 1
    got = plugin._rows_radix(q, kb, n, n_init, n - 16).long().cpu()
    assert got.shape == want.shape
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("page,grouped", [(16, True), (1, True), (16, False)])
def test_grouped_paged_kernel_matches_torch(page, grouped):
    """One list per KV head: the group kernel (each byte read once for the group) against the torch reference."""
    g = torch.Generator().manual_seed(12 + page)
    b, hq, hkv, c, d, n = 1, 8, 2, 512, 16, 470
    q = torch.randn(b, hq, 1, d, generator=g).to(DEVICE)
    k, v = (torch.randn(b, hkv, c, d, generator=g).to(DEVICE) for _ in range(2))
    pages = torch.randint(0, (n + page - 1) // page, (b, hkv, 40), generator=g)
    pages[..., 3] = -1
    pages[..., -1] = (n - 1) // page
    pages = pages.to(DEVICE)
    nn = torch.tensor([n], device=DEVICE)
    want = paged_decode.paged_attention_torch(q, k, v, pages, nn, page, 0.3)
    got = paged_decode.paged_attention_triton(q, k, v, pages.int(), nn, page, 0.3, pages_per_split=16 if page > 1 else 32,
                                              grouped=grouped)
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [{}, {"select_args": {"radix": 2}, "union": True},
                                     {"merge": True, "union": True, "select_args": {"radix": 0}},
                                     {"segment_from": 16, "segment": 16},  # the default for long rows, made short
                                     {"dot": True}])
def test_quest_triton_attend_variants_match_torch_path(variant):
    """QuestDecode.attend_triton (scores kernel, select variants, paged / union kernels) against the plugin's torch
    path over two steps of three layers (float32): the same bounds updates and outputs."""
    from types import SimpleNamespace

    from scbench.methods.quest import Quest
    from scbench.methods.quest_fast import QuestDecode

    g = torch.Generator().manual_seed(17)
    n, cap, layers = 704, 768, 3  # the second step starts a page
    k = [torch.randn(1, 2, cap, 16, generator=g).to(DEVICE) for _ in range(layers)]
    v = [torch.randn(1, 2, cap, 16, generator=g).to(DEVICE) for _ in range(layers)]
    q = [torch.randn(1, 8, 1, 16, generator=g).to(DEVICE) for _ in range(layers)]
    kv = SimpleNamespace(k=k, v=v, at=torch.full((layers,), n - 1, device=DEVICE), lengths=[n - 1] * layers)
    ref, new = (QuestDecode(Quest(budget=256, dense_layers=1)) for _ in range(2))
    for key, val in variant.items():
        setattr(new, key, val)
    for plugin in (ref, new):
        plugin.allocate(kv, None)
        plugin.load(kv, None)
    for step in range(2):
        kv.at.fill_(n - 1 + step)
        for l in range(1, layers):
            ref._n = new._n = kv.at + 1
            want = fastdecode_torch(ref, kv, l, q[l])
            got = new.attend_triton(kv, l, q[l], k[l], v[l], 0.25)
            torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)
            assert torch.equal(new.kmin[l].cpu(), ref.kmin[l].cpu()) and torch.equal(new.kmax[l].cpu(), ref.kmax[l].cpu())


def fastdecode_torch(plugin, kv, l, q):
    at = kv.at[l : l + 1]
    return paged_decode.paged_attention_torch(q, kv.k[l], kv.v[l], plugin.pages(kv, l, q), at + 1, 16, 0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the plugins' CUDA branch)")
@pytest.mark.parametrize("gqa", ["head", "group"])
def test_plugins_cuda_attend_matches_cpu_path(gqa):
    """QuestDecode / RetrievalDecode.attend on CUDA (sort-free select + paged kernels) against their CPU torch path
    on the same float32 inputs, three layers of one step."""
    from types import SimpleNamespace

    from scbench.methods.quest import Quest
    from scbench.methods.quest_fast import QuestDecode
    from scbench.methods.retrieval_attention import RetrievalAttention
    from scbench.methods.retrieval_fast import RetrievalDecode

    g = torch.Generator().manual_seed(13)
    n, cap, layers = 3000, 3072, 3
    k = [torch.randn(1, 2, cap, 64, generator=g) for _ in range(layers)]
    v = [torch.randn(1, 2, cap, 64, generator=g) for _ in range(layers)]
    q = [torch.randn(1, 8, 1, 64, generator=g) for _ in range(layers)]

    def run(make, device):
        kv = SimpleNamespace(k=[x.to(device) for x in k], v=[x.to(device) for x in v],
                             at=torch.full((layers,), n - 1, device=device), lengths=[n - 1] * layers)
        plugin = make()
        for hook in ("allocate", "load"):
            if hasattr(plugin, hook):
                getattr(plugin, hook)(kv, None)
        for _ in range(2):  # two steps: per-step state (RetrievalDecode's radix work, zeroed at layer 0) is reused
            outs = [plugin.attend(kv, l, q[l].to(device), kv.k[l], kv.v[l], 0.125) for l in range(layers)]
        return [None if o is None else o.cpu() for o in outs]

    def retrieval(fused: bool):
        plugin = RetrievalDecode(RetrievalAttention(top_k=256, n_init=16, n_local=64, gqa=gqa, tier="device"))
        plugin.fused = fused
        return plugin

    for make in (lambda: QuestDecode(Quest(budget=512, dense_layers=1, gqa=gqa)), lambda: retrieval(False),
                 lambda: retrieval(True)):
        for a, b in zip(run(make, "cuda"), run(make, "cpu")):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
