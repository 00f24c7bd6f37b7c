"""Quest's page select in one launch per layer: a threshold from the row's statistics, then an exact search over the
few pages above it (CUDA; CPU tensors in Triton's interpreter).

``topk_select.quest_select_triton`` finds the pick-th largest page score by a search over the whole row (rows of
4,096+ pages in two launches: each segment's best, then the row's). ``threshold_select`` runs one small program per
row (a warp or two: each count of the search is a warp reduction, no barrier across warps) that

1. reads the row once for the mean and deviation of its candidate scores (-inf: not a candidate),
2. sets a threshold T at the normal quantile that leaves about ``2 * pick + 32`` scores above it and compacts the
   scores >= T, in page order, into a scratch row of ``cap`` slots,
3. when that kept at least pick and at most ``cap`` pages, finds the exact pick best among them with
   ``_top_mask_search`` (every page of the row's top pick is >= T, so it is among them; ties: the lowest pages);
   otherwise (a distribution far from normal) bisects the float keys' bits over the whole row in chunks (32 counts
   over memory, exact, slower).

The list is ``quest_select_triton``'s: the pick best pages ascending, -1 up to k, then the ``recent`` newest pages;
tests/unit/test_quest_select.py compares them (and ``torch.topk``) on random and adversarial rows.
"""
from __future__ import annotations

import torch

from scbench.kernels.topk_select import triton

if triton is not None:
    import triton.language as tl

    from scbench.kernels.paged_decode import _pdl
    from scbench.kernels.topk_select import _quest_pick, _skey, _top_mask_search

    @triton.jit
    def _threshold_kernel(S, N, Out, SV, SI, P, K, budget, NDIV, margin, CAP: tl.constexpr, CH: tl.constexpr,
                          KP: tl.constexpr, PAGE: tl.constexpr, RECENT: tl.constexpr, RP: tl.constexpr,
                          NCH: tl.constexpr, NP: tl.constexpr, RANK: tl.constexpr, RC: tl.constexpr,
                          PDL: tl.constexpr = False):
        _pdl(PDL)
        r = tl.program_id(0)
        cand, pick = _quest_pick(N + r // NDIV, K, budget, PAGE, RECENT)
        row = S + r.to(tl.int64) * P
        offs = tl.arange(0, CH)
        n_ok = tl.zeros([], tl.int32)
        sx = tl.zeros([], tl.float32)
        sxx = tl.zeros([], tl.float32)
        for c in range(NCH):  # 1. the candidates' count, mean and deviation
            x = tl.load(row + c * CH + offs, mask=c * CH + offs < P, other=float("-inf"))
            ok = x > float("-inf")
            xs = tl.where(ok, x, 0.0)
            n_ok += tl.sum(ok.to(tl.int32), 0)
            sx += tl.sum(xs, 0)
            sxx += tl.sum(xs * xs, 0)
        kk = tl.minimum(pick, n_ok)
        cnt = tl.maximum(n_ok, 1).to(tl.float32)
        mean = sx / cnt
        sd = tl.sqrt(tl.maximum(sxx / cnt - mean * mean, 0.0))
        pr = (margin * kk.to(tl.float32) + 32.0) / cnt  # upper-tail share to keep (Abramowitz-Stegun 26.2.23)
        t = tl.sqrt(-2.0 * tl.log(tl.minimum(tl.maximum(tl.minimum(pr, 1.0 - pr), 1e-30), 0.5)))
        z = t - (2.515517 + 0.802853 * t + 0.010328 * t * t) / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
        z = tl.where(pr < 0.5, z, -z)
        thr = tl.where(pr >= 1.0, float("-inf"), mean + z * sd)
        sv, si = SV + r.to(tl.int64) * CAP, SI + r.to(tl.int64) * CAP
        kept = tl.zeros([], tl.int32)
        for c in range(NCH):  # 2. compact the scores >= thr (page order) into the scratch row
            x = tl.load(row + c * CH + offs, mask=c * CH + offs < P, other=float("-inf"))
            keep = (x > float("-inf")) & (x >= thr)
            pos = kept + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(sv + pos, x, mask=keep & (pos < CAP))
            tl.store(si + pos, c * CH + offs, mask=keep & (pos < CAP))
            kept += tl.sum(keep.to(tl.int32), 0)
        base = Out + r.to(tl.int64) * (K + RECENT)
        j = tl.arange(0, KP)
        tl.store(base + j, tl.full([KP], -1, tl.int32), mask=(j >= kk) & (j < K))
        jr = tl.arange(0, RP)
        tl.store(base + K + jr, cand + jr, mask=jr < RECENT)
        tl.debug_barrier()
        if (kept >= kk) & (kept <= CAP):  # 3. the exact pick best among the kept (all of the row's best are)
            slot = tl.arange(0, CAP)
            x = tl.load(sv + slot, mask=slot < kept, other=float("-inf"))
            if RANK:  # each kept page's rank by counting the kept pages ahead of it (ties: lower pages first)
                rank = tl.zeros([CAP], tl.int32)
                c0 = kept * 0
                while c0 < kept:
                    jb = c0 + tl.arange(0, RC)
                    xb = tl.load(sv + jb, mask=jb < kept, other=float("-inf"))
                    ahead = (xb[None, :] > x[:, None]) | ((xb[None, :] == x[:, None]) & (jb[None, :] < slot[:, None]))
                    rank += tl.sum(ahead.to(tl.int32), 1)
                    c0 += RC
                sel = (slot < kept) & (rank < kk)
            else:
                sel = _top_mask_search(x, kk)
            pos = tl.cumsum(sel.to(tl.int32), 0) - 1
            tl.store(base + pos, tl.load(si + slot, mask=sel, other=-1), mask=sel)
        elif NP <= 16384:  # a row far from normal: the search over the whole row in registers (exact)
            offs_r = tl.arange(0, NP)
            x_r = tl.load(row + offs_r, mask=offs_r < P, other=float("-inf"))
            sel_r = _top_mask_search(x_r, kk)
            tl.store(base + tl.cumsum(sel_r.to(tl.int32), 0) - 1, offs_r, mask=sel_r)
        else:  # longer rows: bisection on the keys' bits over the row in chunks (exact)
            ans = tl.full([], -2147483647, tl.int32) - 1
            c0 = tl.zeros([], tl.int32)
            for c in range(NCH):
                x = tl.load(row + c * CH + offs, mask=c * CH + offs < P, other=float("-inf"))
                c0 += tl.sum(((x > float("-inf")) & (_skey(x) >= 0)).to(tl.int32), 0)
            ans = tl.where(c0 >= kk, 0, ans)
            for i in range(31):
                probe = ans + (1 << (30 - i))
                cp = tl.zeros([], tl.int32)
                for c in range(NCH):
                    x = tl.load(row + c * CH + offs, mask=c * CH + offs < P, other=float("-inf"))
                    cp += tl.sum(((x > float("-inf")) & (_skey(x) >= probe)).to(tl.int32), 0)
                ans = tl.where(cp >= kk, probe, ans)
            n_gt = tl.zeros([], tl.int32)
            for c in range(NCH):
                x = tl.load(row + c * CH + offs, mask=c * CH + offs < P, other=float("-inf"))
                n_gt += tl.sum(((x > float("-inf")) & (_skey(x) > ans)).to(tl.int32), 0)
            ties = kk - n_gt
            done = tl.zeros([], tl.int32)
            tied = tl.zeros([], tl.int32)
            for c in range(NCH):
                x = tl.load(row + c * CH + offs, mask=c * CH + offs < P, other=float("-inf"))
                ok = x > float("-inf")
                key = _skey(x)
                tie = ok & (key == ans)
                rank = tied + tl.cumsum(tie.to(tl.int32), 0) - tie.to(tl.int32)
                sel = ok & ((key > ans) | (tie & (rank < ties))) & (kk > 0)
                pos = done + tl.cumsum(sel.to(tl.int32), 0) - 1
                tl.store(base + pos, c * CH + offs, mask=sel)
                done += tl.sum(sel.to(tl.int32), 0)
                tied += tl.sum(tie.to(tl.int32), 0)


def threshold_select(s: torch.Tensor, n: torch.Tensor, page: int, budget: int, recent: int, k: int,
                     cap: int | None = None, chunk: int = 1024, num_warps: int = 1, pdl: bool = False,
                     rank: bool = False, margin: float = 2.0, rank_chunk: int = 32,
                     chunked_fallback: bool = False) -> torch.Tensor:
    """``topk_select.quest_select_triton``'s contract: s float32 [B, Hs, P] page scores (-inf: not a candidate), n
    [1] the valid length -> int32 [B, Hs, k + recent] (the ``min(pick, k)`` best pages ascending, -1, then the
    ``recent`` newest); n [B] instead: each batch entry's own valid length (a batch over a shared context,
    methods/quest_batch.py). ``cap``: scratch slots per row (a power of two, >= k; default: 4 * k rounded up), ``chunk``:
    scores per pass step (a power of two). ``pdl``: launched as a programmatic dependent (CUDA, Hopper+).
    ``margin``: the threshold keeps about ``margin * pick + 32`` pages; ``rank``: the pick best of those by counting
    each one's rank (``rank_chunk`` pages at a time) instead of the search; a row whose kept count is below pick or
    above ``cap`` is searched whole (rows of up to 16,384 pages; longer, or ``chunked_fallback``: bisection in
    chunks)."""
    from scbench.kernels.paged_decode import pdl_args

    b, hs, p = s.shape
    if s.dtype != torch.float32:
        raise ValueError(f"threshold_select: page scores must be float32, got {s.dtype}")
    cap = cap or max(16, triton.next_power_of_2(4 * max(k, 1)))
    if cap < k or cap & (cap - 1) or chunk & (chunk - 1):
        raise ValueError(f"threshold_select: cap ({cap}) must be a power of two >= k ({k}), chunk ({chunk}) a power "
                         "of two")
    r = b * hs
    out = torch.empty(b, hs, k + recent, dtype=torch.int32, device=s.device)
    sv = torch.empty(r, cap, dtype=torch.float32, device=s.device)
    si = torch.empty(r, cap, dtype=torch.int32, device=s.device)
    ch = min(chunk, max(16, triton.next_power_of_2(p)))
    if n.numel() not in (1, b):
        raise ValueError(f"threshold_select: n must hold 1 or {b} lengths, got {n.numel()}")
    _threshold_kernel[(r,)](s.contiguous(), n, out, sv, si, p, k, budget, hs if n.numel() > 1 else 1 << 30, margin,
                            CAP=cap, CH=ch, NP=1 << 30 if chunked_fallback else max(16, triton.next_power_of_2(p)), RANK=rank, RC=rank_chunk,
                            KP=max(2, triton.next_power_of_2(k)), PAGE=page, RECENT=recent,
                            RP=max(2, triton.next_power_of_2(recent)), NCH=triton.cdiv(p, ch), num_warps=num_warps,
                            **pdl_args(pdl))
    return out
