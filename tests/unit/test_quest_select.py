"""Quest's one-launch threshold select (scbench/kernels/quest_select.py) against quest_select_triton and
torch.topk: random rows, and rows that send it to its bisection fallback. CUDA, or CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1``); skipped without Triton."""
import os

import pytest
import torch

from scbench.kernels import paged_decode, quest_scores, quest_select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(quest_select.triton is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
                                reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")


def _rows(p, n, page, recent, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 3, p, generator=g)
    s[0, 0] = torch.full((p,), 1.5)  # all equal: everything kept, over the cap -> fallback
    s[0, 1] = torch.randint(0, 3, (p,), generator=g).float()  # few distinct values: ties at the threshold
    s[0, 2] = 1.0 + torch.rand(p, generator=g) * 1e-3
    s[0, 2, :3] = -1e6  # outliers: the normal threshold lands above every score -> fallback
    s[1, 1] = s[1, 1].abs() ** 3  # skewed
    s[1, 2, 5:9] = float("-inf")  # scattered non-candidates
    cand = max(0, (n - 1) // page - recent + 1)
    s[..., cand:] = float("-inf")
    return s.to(DEVICE)


@pytest.mark.parametrize("rank,chunked", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("p,n,budget,recent,page,cap,chunk", [(90, 1500, 160, 1, 16, None, 32),
                                                              (90, 1500, 160, 1, 16, 16, 64),
                                                              (40, 600, 136, 2, 16, None, 1024),
                                                              (40, 640, 16, 1, 16, None, 16),
                                                              (20, 100, 512, 1, 8, None, 16)])
def test_threshold_select_matches_quest_select(p, n, budget, recent, page, cap, chunk, rank, chunked):
    s = _rows(p, n, page, recent, p + n)
    nn = torch.tensor([n], device=DEVICE)
    k = min(p, (budget - 1) // page)
    want = quest_select.quest_select_triton(s, nn, page, budget, recent, k)
    got = quest_select.threshold_select(s, nn, page, budget, recent, k, cap=cap, chunk=chunk, rank=rank, rank_chunk=8,
                                        margin=1.25 if rank else 2.0, chunked_fallback=chunked)
    assert torch.equal(got.cpu(), want.cpu())
    top = s.topk(k, dim=-1)  # and torch.topk's scores (ties may pick other pages)
    ref = quest_scores.quest_page_list(top.values, top.indices, nn, page, budget, recent).cpu()
    for i in range(2):
        for h in range(3):
            g_, r_ = got[i, h, :k].long().cpu(), ref[i, h, :k]
            sc = s[i, h].cpu()
            assert torch.equal(sc[g_[g_ >= 0]].sort().values, sc[r_[r_ >= 0]].sort().values)


def test_threshold_select_rejects_bad_args():
    s = torch.zeros(1, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cap"):
        quest_select.threshold_select(s, torch.tensor([100], device=DEVICE), 16, 64, 1, 3, cap=2)
    with pytest.raises(ValueError, match="float32"):
        quest_select.threshold_select(s.half(), torch.tensor([100], device=DEVICE), 16, 64, 1, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("p,warps", [(8192, 1), (8192, 4), (2016, 2)])
def test_threshold_select_cuda_llama_shapes(p, warps):
    """Rows of a 131K / 32K context (8,192 / 2,016 pages, 32 query heads), Quest 4096: the same lists as the
    two-stage / one-stage select, on normal scores and on skewed ones."""
    torch.manual_seed(p)
    n = p * 16 - 5
    s = torch.randn(1, 32, p, device="cuda")
    s[0, 16:] = s[0, 16:].exp() ** 2
    s[..., (n - 1) // 16:] = float("-inf")
    nn = torch.tensor([n], device="cuda")
    k = (4096 - 1) // 16
    want = quest_select.quest_select_triton(s, nn, 16, 4096, 1, k, segment=1024 if p >= 4096 else None, radix=2)
    got = quest_select.threshold_select(s, nn, 16, 4096, 1, k, num_warps=warps)
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper+ CUDA GPU")
def test_pdl_chain_in_cuda_graph():
    """Scores -> threshold select -> paged attention launched as programmatic dependents, captured in a CUDA graph:
    the same pages and output as plain launches."""
    from scbench.kernels import paged_dot

    torch.manual_seed(0)
    c, p, hq, hkv, d, at = 16384, 16, 32, 8, 128, 15000
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, hkv, c, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kmin, kmax = (torch.randn(1, hkv, c // p, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    atv = torch.tensor([at], device="cuda")
    counter = torch.zeros(64, dtype=torch.int32, device="cuda")
    kk = (4096 - 1) // p

    def chain(pdl, attend):
        s = quest_scores.quest_scores_triton(q, k, kmin, kmax, atv, p, 1, False, pdl=pdl)
        pages = quest_select.threshold_select(s, atv + 1, p, 4096, 1, kk, num_warps=4, chunk=8192, pdl=pdl)
        return pages, attend(q, k, v, pages, atv + 1, p, 0.09, counter=counter, pdl=pdl)

    for attend in (paged_decode.paged_attention_triton, paged_dot.paged_dot_triton):
        want = chain(False, attend)
        chain(True, attend)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            got = chain(True, attend)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert not counter.any()


@pytest.mark.parametrize("at,group", [(300, False), (257, True)])
def test_scores_loop_kernel_matches_blocks(at, group):
    """The pipelined score kernel (several page blocks per program) writes the one-block kernel's scores and
    bounds update (CUDA, or the interpreter on CPU)."""
    g = torch.Generator().manual_seed(at)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q = torch.randn(1, 8, 1, 32, generator=g).to(DEVICE, dtype)
    k = torch.randn(1, 2, 352, 32, generator=g).to(DEVICE, dtype)
    lo, hi = (torch.randn(1, 2, 22, 32, generator=g).to(DEVICE, dtype) for _ in range(2))
    atv = torch.tensor([at], device=DEVICE)
    lo2, hi2 = lo.clone(), hi.clone()
    want = quest_scores.quest_scores_triton(q, k, lo, hi, atv, 16, 1, group, block_pages=16)
    got = quest_scores.quest_scores_triton(q, k, lo2, hi2, atv, 16, 1, group, block_pages=16, loop_pages=32, stages=2)
    assert torch.equal(lo, lo2) and torch.equal(hi, hi2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("at,group", [(300, False), (257, True), (16, False)])
def test_scores_kernels_match_torch(at, group):
    """Both score kernels (one block of pages per program, and several, pipelined) against the torch reference
    (``quest.page_scores`` over the bounds updated in torch): scores of the candidate pages, -inf after them."""
    from scbench.methods.quest import page_scores
    from support import quest_bounds_after

    g = torch.Generator().manual_seed(at + group)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    q = torch.randn(1, 8, 1, 32, generator=g).to(DEVICE, dtype)
    k = torch.randn(1, 2, 352, 32, generator=g).to(DEVICE, dtype)
    lo, hi = (torch.randn(1, 2, 22, 32, generator=g).to(DEVICE, dtype) for _ in range(2))
    want_lo, want_hi = quest_bounds_after(lo, hi, k, at, 16)
    want = page_scores(q[:, :, 0].float(), want_lo.float(), want_hi.float())
    if group:
        want = want.reshape(1, 2, 4, 22).amax(2)
    cand = at // 16  # pages before the newest one (recent_pages 1)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for kw in ({}, {"loop_pages": 32, "stages": 2}):
        l2, h2 = lo.clone(), hi.clone()
        got = quest_scores.quest_scores_triton(q, k, l2, h2, torch.tensor([at], device=DEVICE), 16, 1, group,
                                               block_pages=16, **kw)
        assert torch.equal(l2, want_lo) and torch.equal(h2, want_hi)
        torch.testing.assert_close(got[..., :cand].float().cpu(), want[..., :cand].cpu(), atol=tol, rtol=tol)
        assert torch.isinf(got[..., cand:]).all()
