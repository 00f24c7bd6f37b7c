"""Quest's page select on the device: from page scores [B, Hs, P] (-inf: not a candidate) and the valid length, the
pick best pages of each row in ascending order, -1 up to k, then the ``recent`` newest pages (Quest's pick count
``(budget - (n - r0)) // page`` computed from n on the device). CUDA; CPU tensors in Triton's interpreter. Reference:
``topk`` + ``quest_scores.quest_page_list``.

``quest_select_triton``: one program per row (P up to ~16K) finds the pick-th largest score on the float's
order-preserving integer key (32 bisection steps in registers, 4 radix histograms, or an interpolating search);
rows of 4,096+ pages in two launches (each segment's best, then the row's).

``threshold_select``: the same list in one launch per layer, one small program per row (a warp or two: each count of
the search is a warp reduction, no barrier across warps) that

1. reads the row once for the mean and deviation of its candidate scores,
2. sets a threshold T at the normal quantile that leaves about ``2 * pick + 32`` scores above it and compacts the
   scores >= T, in page order, into a scratch row of ``cap`` slots,
3. when that kept at least pick and at most ``cap`` pages, finds the exact pick best among them with
   ``_top_mask_search`` (every page of the row's top pick is >= T, so it is among them; ties: the lowest pages);
   otherwise (a distribution far from normal) bisects the float keys' bits over the whole row in chunks (32 counts
   over memory, exact, slower).

tests/unit/test_topk_select.py and tests/unit/test_quest_select.py compare them (and ``torch.topk``) on random and
adversarial rows.
"""
from __future__ import annotations

import torch

from scbench.kernels.topk_select import triton

if triton is not None:
    import triton.language as tl

    from scbench.kernels.paged_decode import _pdl
    from scbench.kernels.topk_select import _ukey

    @triton.jit
    def _top_mask(x, kk):
        """Which entries of x (float32, -inf: excluded) are its kk largest (ties: the lowest positions): the
        kk-th largest key by bisection on its bits (32 counts), then the entries above it and enough ties."""
        b = x.to(tl.int32, bitcast=True)
        key = tl.where(b < 0, b ^ 2147483647, b)  # signed order = float order
        cnt = tl.sum((key >= 0).to(tl.int32), 0)
        ans = tl.where(cnt >= kk, 0, tl.full([], -2147483647, tl.int32) - 1)  # the sign bit first
        for i in tl.static_range(31):
            c = ans + (1 << (30 - i))
            cnt = tl.sum((key >= c).to(tl.int32), 0)
            ans = tl.where(cnt >= kk, c, ans)
        gt = key > ans
        tie = key == ans
        rank = tl.cumsum(tie.to(tl.int32), 0) - tie.to(tl.int32)
        return (x > float("-inf")) & (gt | (tie & (rank < kk - tl.sum(gt.to(tl.int32), 0)))) & (kk > 0)

    @triton.jit
    def _top_mask_radix(x, kk):
        """``_top_mask``'s result with the kk-th largest key found 8 bits at a time: 4 histograms (256 bins) of
        the entries whose key matches the digits found so far, instead of 32 bisection counts."""
        u = _ukey(x)
        valid = x > float("-inf")
        bins = tl.arange(0, 256)
        val = tl.zeros([], tl.uint32)
        krem = kk
        for i in tl.static_range(4):
            if i == 0:
                match = valid
            else:
                match = valid & ((u >> (32 - 8 * i)) == (val >> (32 - 8 * i)))
            h = tl.histogram(((u >> (24 - 8 * i)) & 255).to(tl.int32), 256, mask=match)
            suffix = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # entries with this digit or a larger one
            d = tl.max(tl.where(suffix >= krem, bins, 0), 0)
            krem -= tl.sum(tl.where(bins > d, h, 0), 0)
            val = val | (d.to(tl.uint32) << (24 - 8 * i))
        gt = valid & (u > val)
        tie = valid & (u == val)
        rank = tl.cumsum(tie.to(tl.int32), 0) - tie.to(tl.int32)
        return (gt | (tie & (rank < krem))) & (kk > 0)

    @triton.jit
    def _fkey(k):
        """Signed-order key (int64 holding an int32) -> its float32."""
        k32 = k.to(tl.int32)
        return tl.where(k32 < 0, k32 ^ 2147483647, k32).to(tl.float32, bitcast=True)

    @triton.jit
    def _skey(f):
        """float32 -> signed-order int32 key."""
        b = f.to(tl.int32, bitcast=True)
        return tl.where(b < 0, b ^ 2147483647, b)

    @triton.jit
    def _top_mask_search(x, kk):
        """``_top_mask``'s result in fewer counts (~5-15 on page scores, against 32): a bracket [lo, hi) of
        signed-order keys with count(key >= lo) >= kk > count(key >= hi) (first: the smallest valid key, past the
        largest) narrows to count(key >= lo) == kk or hi == lo + 1. The first probe is the normal quantile of the
        scores' mean and deviation; then false-position steps in the values (Illinois weights); every third step
        halves the key range unless the last three shrank it 4-fold, so a search ends within ~100 counts whatever
        the values. Then the entries >= hi and the lowest-position entries of [lo, hi) up to kk are taken."""
        key = _skey(x)
        valid = x > float("-inf")
        xs = tl.where(valid, x, 0.0)
        n_ok, sx, sxx, lo, hi = tl.reduce((valid.to(tl.int32), xs, xs * xs, tl.where(valid, key, 2147483647),
                                           tl.where(valid, key, -2147483647 - 1)), 0, _stats)  # one pass
        lo = lo.to(tl.int64)
        hi = hi.to(tl.int64) + 1
        cnt = tl.maximum(n_ok, 1).to(tl.float32)
        mean = sx / cnt
        sd = tl.sqrt(tl.maximum(sxx / cnt - mean * mean, 0.0))
        pr = (kk.to(tl.float32) - 0.5) / cnt  # upper-tail share: z = Q^-1(pr) (Abramowitz-Stegun 26.2.23)
        t = tl.sqrt(-2.0 * tl.log(tl.minimum(tl.maximum(tl.minimum(pr, 1.0 - pr), 1e-30), 0.5)))
        z = t - (2.515517 + 0.802853 * t + 0.010328 * t * t) / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
        z = tl.where(pr < 0.5, z, -z)
        c_lo = n_ok
        c_hi = n_ok * 0
        it = n_ok * 0
        side = n_ok * 0
        w_lo = mean * 0.0 + 1.0
        w_hi = mean * 0.0 + 1.0
        width = hi - lo
        while (kk > 0) & (c_lo != kk) & (hi - lo > 1):
            a = (c_lo - kk).to(tl.float32) + 0.5
            b = (kk - c_hi).to(tl.float32) - 0.5
            flo = _fkey(lo)
            fm = flo + (_fkey(hi - 1) - flo) * (a * w_hi / (a * w_hi + b * w_lo))
            fm = tl.where(it == 0, mean + z * sd, fm)
            halve = (it % 3 == 2) & (hi - lo > width // 4)
            mid = tl.where(halve, lo + (hi - lo) // 2, _skey(fm).to(tl.int64))
            width = tl.where(it % 3 == 2, hi - lo, width)
            mid = tl.minimum(tl.maximum(mid, lo + 1), hi - 1)
            c = tl.sum((key >= mid).to(tl.int32), 0)
            up = c >= kk
            lo = tl.where(up, mid, lo)
            c_lo = tl.where(up, c, c_lo)
            hi = tl.where(up, hi, mid)
            c_hi = tl.where(up, c_hi, c)
            w_hi = tl.where(up, tl.where(side == 1, w_hi * 0.5, 1.0), 1.0)
            w_lo = tl.where(up, 1.0, tl.where(side == -1, w_lo * 0.5, 1.0))
            side = tl.where(up, 1, -1)
            it += 1
        if c_lo == kk:  # exactly kk keys >= lo: no tie to break
            sel = valid & (key >= lo)
        else:
            band = valid & (key >= lo) & (key < hi)
            rank = tl.cumsum(band.to(tl.int32), 0) - band.to(tl.int32)
            sel = valid & ((key >= hi) | (band & (rank < kk - c_hi)))
        return sel & (kk > 0)

    @triton.jit
    def _stats(n0, s0, q0, lo0, hi0, n1, s1, q1, lo1, hi1):
        return n0 + n1, s0 + s1, q0 + q1, tl.minimum(lo0, lo1), tl.maximum(hi0, hi1)

    @triton.jit
    def _quest_pick(N, K, budget, PAGE: tl.constexpr, RECENT: tl.constexpr):
        n = tl.load(N).to(tl.int32)
        r0 = tl.maximum(((n - 1) // PAGE - RECENT + 1) * PAGE, 0)
        return r0 // PAGE, tl.minimum((budget - (n - r0)) // PAGE, K)

    @triton.jit
    def _quest_local_kernel(S, N, CV, CI, P, K, budget, SEG: tl.constexpr, KP: tl.constexpr, PAGE: tl.constexpr,
                            RECENT: tl.constexpr, RADIX: tl.constexpr, Map=None, MAP: tl.constexpr = False):
        """(row, segment of SEG pages): the segment's pick best pages (values, page indices, ascending) into
        CV / CI [R, segments, K]: every row's pick best are among its segments' (stage 1 of two)."""
        r, sg = tl.program_id(0), tl.program_id(1)
        cand, pick = _quest_pick(N, K, budget, PAGE, RECENT)
        offs = sg * SEG + tl.arange(0, SEG)
        x = tl.load(S + r.to(tl.int64) * P + offs, mask=offs < P, other=float("-inf"))
        kk = tl.minimum(pick, tl.sum((x > float("-inf")).to(tl.int32), 0))
        sel = _top_mask_radix(x, kk) if RADIX == 1 else _top_mask_search(x, kk) if RADIX == 2 else _top_mask(x, kk)
        pos = tl.cumsum(sel.to(tl.int32), 0) - 1
        base = (r * tl.num_programs(1) + sg).to(tl.int64) * K
        tl.store(CV + base + pos, x, mask=sel)
        tl.store(CI + base + pos, offs, mask=sel)
        j = tl.arange(0, KP)
        tl.store(CV + base + j, tl.full([KP], float("-inf"), tl.float32), mask=(j >= kk) & (j < K))
        if MAP:  # cleared here, the row's pages set by stage 2
            tl.store(Map + r.to(tl.int64) * P + offs, tl.zeros([SEG], tl.int8), mask=offs < P)

    @triton.jit
    def _quest_select_kernel(S, Idx, N, Out, P, K, budget, NP: tl.constexpr, PAGE: tl.constexpr,
                             RECENT: tl.constexpr, RP: tl.constexpr, GATHER: tl.constexpr, RADIX: tl.constexpr,
                             Map=None, PM=0, MAP: tl.constexpr = False):
        """Row r of S [R, P] (-inf: not a candidate): the pick largest pages in ascending order, -1 up to K, then
        the RECENT newest pages. Out [R, K + RECENT] int32. GATHER: S holds stage 1's candidates, their page
        indices in Idx [R, P]."""
        r = tl.program_id(0)
        cand, pick = _quest_pick(N, K, budget, PAGE, RECENT)
        offs = tl.arange(0, NP)
        x = tl.load(S + r.to(tl.int64) * P + offs, mask=offs < P, other=float("-inf"))
        kk = tl.minimum(pick, tl.sum((x > float("-inf")).to(tl.int32), 0))
        sel = _top_mask_radix(x, kk) if RADIX == 1 else _top_mask_search(x, kk) if RADIX == 2 else _top_mask(x, kk)
        pos = tl.cumsum(sel.to(tl.int32), 0) - 1
        base = Out + r.to(tl.int64) * (K + RECENT)
        if GATHER:
            tl.store(base + pos, tl.load(Idx + r.to(tl.int64) * P + offs, mask=sel, other=-1), mask=sel)
        else:
            tl.store(base + pos, offs, mask=sel)
        tl.store(base + offs, tl.full([NP], -1, tl.int32), mask=(offs >= kk) & (offs < K))
        j = tl.arange(0, RP)
        tl.store(base + K + j, cand + j, mask=j < RECENT)
        if MAP:  # the row's pages as a 0/1 map [PM] (selected or recent): the union kernel's input
            mrow = Map + r.to(tl.int64) * PM
            if GATHER:  # stage 1 cleared the row
                idx = tl.load(Idx + r.to(tl.int64) * P + offs, mask=sel, other=0)
                tl.store(mrow + idx, tl.full([NP], 1, tl.int8), mask=sel)
                tl.store(mrow + cand + j, tl.full([RP], 1, tl.int8), mask=j < RECENT)
            else:
                used = sel | ((offs >= cand) & (offs < cand + RECENT))
                tl.store(mrow + offs, used.to(tl.int8), mask=offs < P)

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


def _warps(np_: int) -> int:
    return 4 if np_ <= 2048 else 8 if np_ <= 8192 else 16


def quest_select_triton(s: torch.Tensor, n: torch.Tensor, page: int, budget: int, recent: int,
                        k: int, num_warps: int | None = None, segment: int | None = None,
                        local_warps: int | None = None, radix: bool | int = False,
                        map_out: torch.Tensor | None = None) -> torch.Tensor:
    """s float32 [B, Hs, P] page scores (-inf: not a candidate); n [1] the valid length -> int32 page list
    [B, Hs, k + recent]: the ``min(pick, k)`` best pages (ascending), -1, then the ``recent`` newest pages.
    ``segment`` (a power of two): long rows first keep each segment's best (one program per row and segment),
    then one program per row selects among those (rows of P pages take P / segment * k candidates). ``radix``:
    the threshold by 4 histogram passes (``_top_mask_radix``), 2: by an interpolating search (``_top_mask_search``,
    ~5-15 counts), instead of 32 bisection counts (same pages). ``map_out`` (int8 [B, Hs, P]): also each row's
    listed pages as a 0/1 map (``paged_union.paged_union_triton``'s input)."""
    radix = int(radix)
    if map_out is not None and (map_out.shape != s.shape or map_out.dtype != torch.int8 or not map_out.is_contiguous()):
        raise ValueError(f"quest_select_triton: map_out must be contiguous int8 {tuple(s.shape)}, got "
                         f"{map_out.dtype} {tuple(map_out.shape)}")
    mapping = dict(Map=map_out, MAP=map_out is not None)
    b, hs, p = s.shape
    out = torch.empty(b, hs, k + recent, dtype=torch.int32, device=s.device)
    rp = max(2, triton.next_power_of_2(recent))
    s = s.contiguous()
    if segment and p > segment and k > 0:
        nseg = triton.cdiv(p, segment)
        cv = torch.empty(b * hs, nseg, k, dtype=torch.float32, device=s.device)
        ci = torch.empty(b * hs, nseg, k, dtype=torch.int32, device=s.device)
        _quest_local_kernel[(b * hs, nseg)](s, n, cv, ci, p, k, budget, SEG=segment, KP=max(2, triton.next_power_of_2(k)),
                                            PAGE=page, RECENT=recent, RADIX=radix, **mapping,
                                            num_warps=local_warps or _warps(segment))
        np_ = triton.next_power_of_2(nseg * k)
        _quest_select_kernel[(b * hs,)](cv, ci, n, out, nseg * k, k, budget, NP=np_, PAGE=page, RECENT=recent, RP=rp,
                                        GATHER=True, RADIX=radix, PM=p, **mapping, num_warps=num_warps or _warps(np_))
        return out
    np_ = max(16, triton.next_power_of_2(p))
    _quest_select_kernel[(b * hs,)](s, s, n, out, p, k, budget, NP=np_, PAGE=page, RECENT=recent, RP=rp, GATHER=False,
                                    RADIX=radix, PM=p, **mapping, num_warps=num_warps or _warps(np_))
    return out


def threshold_select(s: torch.Tensor, n: torch.Tensor, page: int, budget: int, recent: int, k: int,
                     cap: int | None = None, chunk: int = 1024, num_warps: int = 1, pdl: bool = False,
                     rank: bool = False, margin: float = 2.0, rank_chunk: int = 32,
                     chunked_fallback: bool = False) -> torch.Tensor:
    """``quest_select_triton``'s contract: s float32 [B, Hs, P] page scores (-inf: not a candidate), n
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
