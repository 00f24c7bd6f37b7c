"""Exact top-k selection on the device without a sort, for the captured decode plugins (methods/quest_fast.py,
methods/retrieval_fast.py): the k-th largest score is found on the float's order-preserving integer key, then the
rows above it (plus the lowest-index ties up to k) are written out as a compact index list, -1 in unused slots.

- ``quest_select_triton``: one program per row of page scores [R, P] (P up to ~16K): 32 bisection steps over the
  key bits in registers; the list comes out in ascending page order, followed by the ``recent`` pages. Quest's
  pick count (``(budget - (n - r0)) // page``) is computed from n on the device. Reference: ``topk`` +
  ``paged_decode.quest_page_list``.
- ``radix_select_triton``: rows of up to ~1M scores (RetrievalAttention's exact search over every key): one
  histogram pass per digit of the key (``digits_for``: 8 + 8 bits for bfloat16 scores, 11 + 11 + 10 else) over
  (row, chunk) programs (global atomics), then a compaction pass; rows come out
  unordered; which of several exactly-tied scores are taken is unspecified. Reference: ``topk`` over the masked
  scores (``retrieval_fast.RetrievalDecode.rows_torch``).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _ukey(x):
        """float32 -> uint32 whose unsigned order is the float order (-inf lowest)."""
        b = x.to(tl.uint32, bitcast=True)
        return tl.where((b >> 31) != 0, b ^ 0xFFFFFFFF, b | 0x80000000)

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


if triton is not None:

    @triton.jit
    def _walk(Hist, row, R, p, krem, val, S: tl.constexpr, NB: tl.constexpr):
        """One pass's histogram of ``row``: the digit at shift S holding the krem-th largest key among those
        matching ``val`` so far -> (rows still to take at the longer prefix, the prefix with that digit)."""
        bins = tl.arange(0, NB)
        h = tl.load(Hist + (p * R + row).to(tl.int64) * NB + bins)
        suffix = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # rows with digit >= bin
        d = tl.max(tl.where(suffix >= krem, bins, -1), 0)
        krem -= tl.sum(tl.where(bins > d, h, 0), 0)
        return krem, val | (d.to(tl.uint32) << S)

    @triton.jit
    def _find(Hist, row, R, kk, PASS: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
              S3: tl.constexpr, NB: tl.constexpr):
        """Walk the histograms of passes 0..PASS-1 (digit shifts S0 > S1 > ...): (the k-th largest key's bits
        found so far, in place; how many rows still to take lie at that prefix)."""
        val = tl.zeros([], tl.uint32)
        krem = kk
        if PASS > 0:
            krem, val = _walk(Hist, row, R, 0, krem, val, S0, NB)
        if PASS > 1:
            krem, val = _walk(Hist, row, R, 1, krem, val, S1, NB)
        if PASS > 2:
            krem, val = _walk(Hist, row, R, 2, krem, val, S2, NB)
        if PASS > 3:
            krem, val = _walk(Hist, row, R, 3, krem, val, S3, NB)
        return val, krem

    @triton.jit
    def _load_keys(S, N, C, K, n_init, n_local, rs_b, rs_h, row, ch, H: tl.constexpr, CH: tl.constexpr):
        n = tl.load(N).to(tl.int32)
        kk = tl.minimum(K, tl.maximum(n - n_local - n_init, 0))
        offs = ch * CH + tl.arange(0, CH)
        ok = (offs >= n_init) & (offs < n - n_local) & (offs < C) & (kk > 0)
        # mask by the buffer's end only (a multiple of 16 when it is one: vector loads); ``ok`` applies after
        x = tl.load(S + (row // H).to(tl.int64) * rs_b + (row % H) * rs_h + offs, mask=offs < C, other=0.0)
        return _ukey(x.to(tl.float32)), ok, offs, kk

    @triton.jit
    def _hist_kernel(S, N, Hist, C, R, K, n_init, n_local, rs_b, rs_h, H: tl.constexpr, PASS: tl.constexpr,
                     S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, SHIFT: tl.constexpr,
                     PREV: tl.constexpr, NB: tl.constexpr, CH: tl.constexpr):
        """(row, chunk): histogram of the digit at SHIFT (PREV: the previous digit's shift, 32 on the first pass)
        over the keys that match the prefix the earlier passes found."""
        row, ch = tl.program_id(0), tl.program_id(1)
        u, ok, offs, kk = _load_keys(S, N, C, K, n_init, n_local, rs_b, rs_h, row, ch, H, CH)
        if PASS > 0:
            val, krem = _find(Hist, row, R, kk, PASS, S0, S1, S2, S3, NB)
            ok &= (u >> PREV) == (val >> PREV)
        d = ((u >> SHIFT) & ((1 << (PREV - SHIFT)) - 1)).to(tl.int32)
        h = tl.histogram(d, NB, mask=ok)
        bins = tl.arange(0, NB)
        tl.atomic_add(Hist + (PASS * R + row).to(tl.int64) * NB + bins, h, mask=h > 0, sem="relaxed")

    @triton.jit
    def _compact_kernel(S, N, Hist, Cnt, Out, C, R, K, n_init, n_local, rs_b, rs_h, M, H: tl.constexpr,
                        PASSES: tl.constexpr, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                        S3: tl.constexpr, NB: tl.constexpr, CH: tl.constexpr, STATIC: tl.constexpr,
                        NSP: tl.constexpr):
        """(row, chunk): write the indices of the selected rows into Out[row, :K] (unordered); -1 past kk.
        STATIC: Out[row] is [the n_init first rows, the n_local last rows, the K selected] (RetrievalAttention's
        list; a static row not valid yet, or below n_init, is -1)."""
        row, ch = tl.program_id(0), tl.program_id(1)
        u, ok, offs, kk = _load_keys(S, N, C, K, n_init, n_local, rs_b, rs_h, row, ch, H, CH)
        t, krem = _find(Hist, row, R, kk, PASSES, S0, S1, S2, S3, NB)
        gt = ok & (u > t)
        tie = ok & (u == t)
        nt = tl.sum(tie.to(tl.int32), 0)
        tbase = tl.atomic_add(Cnt + 2 * row + 1, nt, sem="relaxed")
        tie &= (tbase + tl.cumsum(tie.to(tl.int32), 0) - 1) < krem
        sel = gt | tie
        base = tl.atomic_add(Cnt + 2 * row, tl.sum(sel.to(tl.int32), 0), sem="relaxed")
        dst = Out + row.to(tl.int64) * M
        if STATIC:
            n = tl.load(N).to(tl.int32)
            j = tl.arange(0, NSP)
            fixed = tl.where(j < n_init, tl.where(j < n, j, -1), n - n_local + j - n_init)
            fixed = tl.where((j >= n_init) & (fixed < n_init), -1, fixed)
            tl.store(dst + j, fixed, mask=(j < n_init + n_local) & (ch == 0))
            dst += n_init + n_local
        tl.store(dst + base + tl.cumsum(sel.to(tl.int32), 0) - 1, offs, mask=sel)
        tl.store(dst + offs, tl.full([CH], -1, tl.int32), mask=(offs >= kk) & (offs < K))  # slots this chunk covers


def digits_for(dtype: torch.dtype) -> tuple[int, ...]:
    """Digit widths of the radix passes, most significant first: bfloat16 scores carry only the top 16 bits of
    their float32 key (two 8-bit passes); other dtypes all 32 (11 + 11 + 10)."""
    return (8, 8) if dtype == torch.bfloat16 else (11, 11, 10)


def _plan(digits: tuple[int, ...] | None, dtype: torch.dtype) -> tuple[tuple[int, ...], list[int], dict, int]:
    digits = tuple(digits or digits_for(dtype))
    if (not 1 <= len(digits) <= 4 or max(digits) > 12 or sum(digits) not in (16, 32)
            or (sum(digits) == 16 and dtype != torch.bfloat16)):
        raise ValueError(f"radix select: digits {digits} must be 1-4 widths of at most 12 bits summing to 32 "
                         "(16: bfloat16 scores only)")
    shifts = [32 - sum(digits[: i + 1]) for i in range(len(digits))]
    return digits, shifts, dict(zip(("S0", "S1", "S2", "S3"), shifts + [0] * (4 - len(shifts)))), 1 << max(digits)


def _work(digits, r: int, nb: int, device) -> torch.Tensor:
    """Zeroed histograms [passes, r, nb] and per-row counters [r, 2] in one buffer (one memset per call)."""
    return torch.zeros(len(digits) * r * nb + 2 * r, dtype=torch.int32, device=device)


def radix_select_triton(s: torch.Tensor, n: torch.Tensor, k: int, n_init: int, n_local: int,
                        out: torch.Tensor | None = None, chunk: int = 4096,
                        digits: tuple[int, ...] | None = None, num_warps: int = 8,
                        work: torch.Tensor | None = None, static: bool = False,
                        first: int | None = None) -> torch.Tensor:
    """s [B, H, C] scores (any float dtype, last dim contiguous); n [1] the valid length -> int32 [B * H, k]:
    the indices of the ``min(k, rows)`` largest scores among positions [n_init, n - n_local), -1 in unused slots
    (or written into the first k columns of ``out`` [B * H, M], int32). ``work``: from ``retrieval_scores_triton``
    (its first histogram pass already done), or zeroed with ``first=0`` (no pass done; ``work_size`` elements, e.g.
    a slice of one buffer zeroed once per step for all layers). ``static``: -> [B * H, n_init + n_local + k], the first n_init and
    the last n_local rows before the selected ones (RetrievalAttention's row list; -1: not valid, or listed)."""
    b, h, c = s.shape
    r = b * h
    if s.stride(2) != 1:
        raise ValueError(f"radix_select_triton: scores {tuple(s.shape)} need a contiguous last dimension")
    ns = n_init + n_local if static else 0
    out = torch.empty(r, ns + k, dtype=torch.int32, device=s.device) if out is None else out
    if out.dtype != torch.int32 or out.shape[0] != r or out.shape[1] < ns + k or out.stride(1) != 1:
        raise ValueError(f"radix_select_triton: out must be int32 [{r}, >= {ns + k}] with contiguous rows")
    digits, shifts, sh, nb = _plan(digits, s.dtype)
    first = (0 if work is None else 1) if first is None else first
    work = _work(digits, r, nb, s.device) if work is None else work
    hist, cnt = work[: len(digits) * r * nb], work[len(digits) * r * nb :]
    grid = (r, triton.cdiv(max(c, k), chunk))
    args = (s, n, hist, c, r, k, n_init, n_local, s.stride(0), s.stride(1))
    for p in range(first, len(digits)):
        _hist_kernel[grid](*args, H=h, PASS=p, **sh, SHIFT=shifts[p], PREV=32 if p == 0 else shifts[p - 1], NB=nb,
                           CH=chunk, num_warps=num_warps)
    _compact_kernel[grid](s, n, hist, cnt, out, c, r, k, n_init, n_local, s.stride(0), s.stride(1), out.stride(0),
                          H=h, PASSES=len(digits), **sh, NB=nb, CH=chunk, STATIC=static,
                          NSP=max(2, triton.next_power_of_2(ns)), num_warps=num_warps)
    return out


if triton is not None:

    @triton.jit
    def _score_hist_kernel(Q, K, S, N, Hist, C, TOPK, n_init, n_local, G: tl.constexpr, GP: tl.constexpr,
                           D: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr, S0: tl.constexpr,
                           NB: tl.constexpr, PREC: tl.constexpr):
        """(batch x KV head, block of BN keys): q.k of the group's query heads (GROUP: their max), stored in S's
        dtype, and the first radix pass's histogram of those scores."""
        bk, ch = tl.program_id(0), tl.program_id(1)
        n = tl.load(N).to(tl.int32)
        kk = tl.minimum(TOPK, tl.maximum(n - n_local - n_init, 0))
        offs = ch * BN + tl.arange(0, BN)
        ok = (offs >= n_init) & (offs < n - n_local) & (offs < C) & (kk > 0)
        cols, rows, bins = tl.arange(0, D), tl.arange(0, GP), tl.arange(0, NB)
        kt = tl.load(K + bk.to(tl.int64) * C * D + offs[:, None] * D + cols[None, :], mask=(offs < C)[:, None],
                     other=0.0)
        q = tl.load(Q + (bk * G + rows)[:, None] * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        s = tl.dot(q.to(kt.dtype), tl.trans(kt), input_precision=PREC).to(S.dtype.element_ty).to(tl.float32)
        if GROUP:
            sg = tl.max(tl.where((rows < G)[:, None], s, float("-inf")), 0)
            tl.store(S + bk.to(tl.int64) * C + offs, sg.to(S.dtype.element_ty), mask=offs < C)
            d = ((_ukey(sg) >> S0) & ((1 << (32 - S0)) - 1)).to(tl.int32)
            h = tl.histogram(d, NB, mask=ok)
            tl.atomic_add(Hist + bk.to(tl.int64) * NB + bins, h, mask=h > 0, sem="relaxed")
        else:
            tl.store(S + (bk * G + rows)[:, None].to(tl.int64) * C + offs[None, :], s.to(S.dtype.element_ty),
                     mask=(rows < G)[:, None] & (offs < C)[None, :])
            for g in tl.static_range(G):
                sg = tl.sum(tl.where((rows == g)[:, None], s, 0.0), 0)
                d = ((_ukey(sg) >> S0) & ((1 << (32 - S0)) - 1)).to(tl.int32)
                h = tl.histogram(d, NB, mask=ok)
                tl.atomic_add(Hist + (bk * G + g).to(tl.int64) * NB + bins, h, mask=h > 0, sem="relaxed")


def retrieval_scores_triton(q: torch.Tensor, k: torch.Tensor, n: torch.Tensor, top_k: int, n_init: int,
                            n_local: int, group: bool, digits: tuple[int, ...] | None = None, block: int = 128,
                            num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, 1, D], keys [B, Hkv, C, D] -> (scores [B, Hs, C] in the keys' dtype, Hs = Hkv if ``group`` (max
    over the group) else Hq; the radix-select work buffer with its first pass done): pass both to
    ``radix_select_triton(..., digits=digits, work=work)``. The scores equal ``q @ k^T`` rounded to the keys' dtype
    (the torch path's matmul) up to the summation order."""
    b, hq, _, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    g = hq // hkv
    hs = hkv if group else hq
    digits, shifts, sh, nb = _plan(digits, k.dtype)
    s = torch.empty(b, hs, c, dtype=k.dtype, device=k.device)
    work = _work(digits, b * hs, nb, k.device)
    _score_hist_kernel[(b * hkv, triton.cdiv(c, block))](
        q.reshape(b * hq, d).contiguous(), k, s, n, work, c, min(top_k, c), n_init, n_local, G=g,
        GP=max(16, triton.next_power_of_2(g)), D=d, BN=block, GROUP=group, S0=shifts[0], NB=nb,
        PREC="ieee" if k.dtype == torch.float32 else "tf32", num_warps=num_warps)
    return s, work


def _sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the interpreter on CPU: 132, an H100 / H200's count)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def work_size(rows: int, dtype: torch.dtype, digits: tuple[int, ...] | None = None) -> int:
    """int32 elements of one call's radix work buffer (histograms and counters) for ``rows`` score rows."""
    digits, _, _, nb = _plan(digits, dtype)
    return len(digits) * rows * nb + 2 * rows
