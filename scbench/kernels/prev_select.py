"""Exact top-k over bfloat16 score rows with the threshold carried over from the previous decode step
(RetrievalAttention's device tier, methods/retrieval_fast.py, ``select=prev``): no sample, no histogram pass over
the whole row; two launches whose second one only reads a few thousand candidates per row.

State: ``thr`` int32 [R] per (layer, row), kept on the device across steps (the CUDA graph updates it in place): a
16-bit order key (the float32 order key's top 16 bits, exact for bfloat16) a ``margin`` of bfloat16 steps below
the previous step's k-th largest score. 0 (the lowest key) at first: the first step takes the whole-row path.

1. ``_filter_kernel`` (row, chunk of CH scores): the scores whose key u >= T (T = thr[row]) are the row's
   candidates: appended (position << 8 | min(u - T, 255)) to the row's list (capacity CAP, one atomic per program)
   and counted in a 256-bin histogram of min(u - T, 255) (bin 255: every key >= T + 255).
2. ``_pick_kernel`` (row, part): from the histogram every program finds the bin d holding the kk-th largest
   candidate and how many ties at it to take (krem). If kk <= candidates and d < 255, the k-th largest key is
   exactly T + d: each program takes its part of the list (CAP <= candidates: of the whole row) above it, plus
   ties up to krem (a per-row atomic counter; which tied rows are taken is unspecified, as in
   ``topk_select.radix_select_triton``). Else (T above the k-th largest, or far below it) the row's program 0
   runs an exact two-pass 8-bit radix select over the whole row (slow, rare). Program 0 then stores
   thr[row] = max(t - margin, 0) for the next step.

Output as ``topk_select.radix_select_triton(static=True)``: [the n_init first rows, the n_local last rows, the kk
selected (unordered), -1 past kk]. The selected set never depends on ``thr`` (only the speed does). Reference:
``topk`` over the masked scores; tests/unit/test_prev_select.py compares score multisets on random rows over
several steps (first step, stale and forced-wrong thresholds, a too-small capacity, ties, short rows).
prev_scores.py: the same select with the scores computed by its filter kernel.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

NB = 256  # histogram bins above the threshold (the last: every key >= T + 255)

if triton is not None:

    @triton.jit
    def _key16(x):
        """float -> int32 in [0, 65536) whose order is the float order (the float32 key's top 16 bits)."""
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = tl.where((b >> 31) != 0, b ^ 0xFFFFFFFF, b | 0x80000000)
        return (u >> 16).to(tl.int32)

    @triton.jit
    def _span(N, K, n_init, n_local):
        n = tl.load(N).to(tl.int32)
        hi = n - n_local
        return n, hi, tl.minimum(K, tl.maximum(hi - n_init, 0))

    @triton.jit
    def _walk(h, krem, NBINS: tl.constexpr):
        """Histogram h [NBINS] of keys, largest bin last -> (the bin holding the krem-th largest, -1 if fewer;
        how many of the krem lie in that bin)."""
        bins = tl.arange(0, NBINS)
        suffix = tl.sum(h, 0) - tl.cumsum(h, 0) + h
        d = tl.max(tl.where(suffix >= krem, bins, -1), 0)
        return d, krem - tl.sum(tl.where(bins > d, h, 0), 0)

    @triton.jit
    def _val16(t):
        """``_key16``'s inverse: the bfloat16 value (as float32) of a 16-bit order key."""
        u = t.to(tl.uint32) << 16
        return tl.where((u >> 31) != 0, u ^ 0x80000000, u ^ 0xFFFFFFFF).to(tl.float32, bitcast=True)

    @triton.jit
    def _threshold(Thr, Work, row, qn, margin, ch, R, NBINS: tl.constexpr):
        """This step's threshold key of ``row``: the previous step's k-th largest score per unit of |q| (Thr, float32
        bits) times this step's |q| (qn), less ``margin`` bfloat16 steps. Program 0 of the row keeps it and qn for
        the pick."""
        tv = tl.load(Thr + row).to(tl.float32, bitcast=True) * qn
        t0 = tl.where(tv == tv, tl.maximum(_key16(tv) - margin, 0), 0)
        if ch == 0:
            tl.store(Work + R * NBINS + 3 * R + row, t0)
            tl.store(Work + R * NBINS + 4 * R + row, qn.to(tl.int32, bitcast=True))
        return t0

    @triton.jit
    def _qnorm(Q, row, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
               HASQ: tl.constexpr):
        """|q| of the row's query head (GROUP: the largest of its group's); 1 without queries."""
        if HASQ:
            cols = tl.arange(0, D)
            if GROUP:
                rows = tl.arange(0, GP)
                q = tl.load(Q + (row * G + rows)[:, None] * D + cols[None, :], mask=(rows < G)[:, None], other=0.0)
                qf = q.to(tl.float32)
                return tl.max(tl.sqrt(tl.sum(qf * qf, 1)), 0)
            else:
                qf = tl.load(Q + row * D + cols).to(tl.float32)
                return tl.sqrt(tl.sum(qf * qf, 0))
        else:
            return tl.full([], 1.0, tl.float32)

    @triton.jit
    def _append(x, offs, row, t0, kk, n_init, hi, C, Work, Cand, R, CAP: tl.constexpr, NBINS: tl.constexpr,
                ATOMIC: tl.constexpr):
        """Row ``row``'s scores x at positions offs: the candidates (key >= t0) into its list and histogram
        (ATOMIC: one atomic per candidate instead of ``tl.histogram``)."""
        u = _key16(x)
        cand = (offs >= n_init) & (offs < hi) & (offs < C) & (kk > 0) & (u >= t0)
        b = tl.minimum(tl.maximum(u - t0, 0), NBINS - 1)
        hist = Work + row.to(tl.int64) * NBINS
        if ATOMIC:
            tl.atomic_add(hist + b, tl.full(b.shape, 1, tl.int32), mask=cand, sem="relaxed")
        else:
            h = tl.histogram(b, NBINS, mask=cand)
            tl.atomic_add(hist + tl.arange(0, NBINS), h, mask=h > 0, sem="relaxed")
        c = cand.to(tl.int32)
        at = tl.atomic_add(Work + R * NBINS + row, tl.sum(c, 0), sem="relaxed")
        dst = at + tl.cumsum(c, 0) - 1
        tl.store(Cand + row.to(tl.int64) * CAP + dst, (offs << 8) | b, mask=cand & (dst < CAP))

    @triton.jit
    def _filter_kernel(S, Q, N, Thr, Work, Cand, C, K, n_init, n_local, rs_b, rs_h, R, margin, H: tl.constexpr,
                       CH: tl.constexpr, CAP: tl.constexpr, NBINS: tl.constexpr, ATOMIC: tl.constexpr,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, HASQ: tl.constexpr,
                       Out=None, M=0, CB: tl.constexpr = 2, FB: tl.constexpr = 2, STATIC: tl.constexpr = False,
                       NSP: tl.constexpr = 2, KP: tl.constexpr = 2, ONE: tl.constexpr = False,
                       LOOP: tl.constexpr = 1):
        """(row, LOOP chunks of CH scores): the row's candidates. ONE: the row's last program to finish then picks
        (its acquire sees the others' released writes)."""
        row, ch = tl.program_id(0), tl.program_id(1)
        n, hi, kk = _span(N, K, n_init, n_local)
        t0 = _threshold(Thr, Work, row, _qnorm(Q, row, G, GP, D, GROUP, HASQ), margin, ch, R, NBINS)
        base = S + (row // H).to(tl.int64) * rs_b + (row % H) * rs_h
        if LOOP == 1:
            offs = ch * CH + tl.arange(0, CH)
            x = tl.load(base + offs, mask=offs < C, other=0.0)
            _append(x, offs, row, t0, kk, n_init, hi, C, Work, Cand, R, CAP, NBINS, ATOMIC)
        else:
            for it in tl.range(0, LOOP):
                offs = (ch * LOOP + it) * CH + tl.arange(0, CH)
                x = tl.load(base + offs, mask=offs < C, other=0.0)
                _append(x, offs, row, t0, kk, n_init, hi, C, Work, Cand, R, CAP, NBINS, ATOMIC)
        if ONE:
            tl.debug_barrier()  # every thread's writes before the one thread's release
            done = tl.atomic_add(Work + R * NBINS + 5 * R + 1 + row, 1, sem="acq_rel", scope="gpu")
            if done == tl.num_programs(1) - 1:
                _pick_row(S, N, Thr, Work, Cand, Out, row, 0, 1, C, K, n_init, n_local, rs_b, rs_h, M, R, H, CAP, CB,
                          NBINS, FB, STATIC, NSP, KP, 0)

    @triton.jit
    def _take(gt, tie, pos, krem, dst, Ties, Taken):
        """Store the positions ``gt`` and the ties whose global rank (a per-row atomic counter) is below krem."""
        ti = tie.to(tl.int32)
        tb = tl.atomic_add(Ties, tl.sum(ti, 0), sem="relaxed")
        sel = gt | (tie & (tb + tl.cumsum(ti, 0) - 1 < krem))
        si = sel.to(tl.int32)
        at = tl.atomic_add(Taken, tl.sum(si, 0), sem="relaxed")
        tl.store(dst + at + tl.cumsum(si, 0) - 1, pos, mask=sel)

    @triton.jit
    def _keep(Thr, Work, row, t, R, NBINS: tl.constexpr):
        """Thr[row] = this step's k-th largest score (key t) per unit of |q| (float32 bits), for the next step."""
        qn = tl.load(Work + R * NBINS + 4 * R + row, cache_modifier=".cg").to(tl.float32, bitcast=True)
        tl.store(Thr + row, (_val16(t) / tl.maximum(qn, 1e-30)).to(tl.int32, bitcast=True))

    @triton.jit
    def _pick_kernel(S, N, Thr, Work, Cand, Out, C, K, n_init, n_local, rs_b, rs_h, M, R, H: tl.constexpr,
                     CAP: tl.constexpr, CB: tl.constexpr, NBINS: tl.constexpr, FB: tl.constexpr,
                     STATIC: tl.constexpr, NSP: tl.constexpr, KP: tl.constexpr, SPLIT: tl.constexpr):
        _pick_row(S, N, Thr, Work, Cand, Out, tl.program_id(0), tl.program_id(1), tl.num_programs(1), C, K, n_init,
                  n_local, rs_b, rs_h, M, R, H, CAP, CB, NBINS, FB, STATIC, NSP, KP, SPLIT)

    @triton.jit
    def _pick_row(S, N, Thr, Work, Cand, Out, row, j, PJ, C, K, n_init, n_local, rs_b, rs_h, M, R, H: tl.constexpr,
                  CAP: tl.constexpr, CB: tl.constexpr, NBINS: tl.constexpr, FB: tl.constexpr,
                  STATIC: tl.constexpr, NSP: tl.constexpr, KP: tl.constexpr, SPLIT: tl.constexpr = 0):
        """Program j of PJ of row ``row``'s pick (loads through L2: in the one-launch filter other programs wrote
        the histogram and the list)."""
        n, hi, kk = _span(N, K, n_init, n_local)
        base = S + (row // H).to(tl.int64) * rs_b + (row % H) * rs_h
        cnt_p = Work + R * NBINS + row
        t0 = tl.load(cnt_p + 3 * R, cache_modifier=".cg")
        cnt = tl.load(cnt_p, cache_modifier=".cg")
        dst = Out + row.to(tl.int64) * M
        if STATIC:
            if j == 0:
                js = tl.arange(0, NSP)
                fixed = tl.where(js < n_init, tl.where(js < n, js, -1), hi + js - n_init)
                fixed = tl.where((js >= n_init) & (fixed < n_init), -1, fixed)
                tl.store(dst + js, fixed, mask=js < n_init + n_local)
            dst += n_init + n_local
        if j == 0:
            jk = tl.arange(0, KP)
            tl.store(dst + jk, tl.full([KP], -1, tl.int32), mask=(jk >= kk) & (jk < K))
        if (kk > 0) & ((j * CB < cnt) | (cnt > CAP) | (j == 0)):  # else: no candidates for this program
            d, krem = _walk(tl.load(Work + row.to(tl.int64) * NBINS + tl.arange(0, NBINS), cache_modifier=".cg"), kk,
                            NBINS)
            if (d >= 0) & (d < NBINS - 1):  # the k-th largest key is t0 + d
                if cnt <= CAP:
                    for i0 in range(j * CB, cnt, PJ * CB):
                        i = i0 + tl.arange(0, CB)
                        ok = i < cnt
                        p = tl.load(Cand + row.to(tl.int64) * CAP + i, mask=ok, other=0, cache_modifier=".cg")
                        bb = p & 255
                        _take(ok & (bb > d), ok & (bb == d), p >> 8, krem, dst, cnt_p + R, cnt_p + 2 * R)
                else:  # the list overflowed: this program's share of the whole row
                    t = t0 + d
                    for c0 in range(j * CB, C, PJ * CB):
                        offs = c0 + tl.arange(0, CB)
                        ok = (offs >= n_init) & (offs < hi)
                        u = _key16(tl.load(base + offs, mask=offs < C, other=0.0))
                        _take(ok & (u > t), ok & (u == t), offs, krem, dst, cnt_p + R, cnt_p + 2 * R)
                if j == 0:
                    _keep(Thr, Work, row, t0 + d, R, NBINS)
            elif (j == 0) & (SPLIT == 0):  # the whole row (SPLIT: ``_fallback_kernel`` does it)
                _whole_row(base, dst, Thr, Work, row, kk, n_init, hi, C, R, NBINS, FB)


if triton is not None:

    @triton.jit
    def _whole_row(base, dst, Thr, Work, row, kk, n_init, hi, C, R, NBINS: tl.constexpr, FB: tl.constexpr):
        """The row's exact select without a threshold: two 8-bit histogram passes, then one selecting pass (one
        program, FB scores at a time)."""
        h = tl.zeros([256], tl.int32)
        for c0 in range(0, C, FB):
            offs = c0 + tl.arange(0, FB)
            ok = (offs >= n_init) & (offs < hi)
            u = _key16(tl.load(base + offs, mask=offs < C, other=0.0))
            h += tl.histogram(u >> 8, 256, mask=ok)
        dh, krem = _walk(h, kk, 256)
        h = tl.zeros([256], tl.int32)
        for c0 in range(0, C, FB):
            offs = c0 + tl.arange(0, FB)
            ok = (offs >= n_init) & (offs < hi)
            u = _key16(tl.load(base + offs, mask=offs < C, other=0.0))
            h += tl.histogram(u & 255, 256, mask=ok & ((u >> 8) == dh))
        dl, krem = _walk(h, krem, 256)
        t = dh * 256 + dl
        taken = tl.zeros([], tl.int32)
        ties = tl.zeros([], tl.int32)
        for c0 in range(0, C, FB):
            offs = c0 + tl.arange(0, FB)
            ok = (offs >= n_init) & (offs < hi)
            u = _key16(tl.load(base + offs, mask=offs < C, other=0.0))
            tie = ok & (u == t)
            ti = tie.to(tl.int32)
            sel = (ok & (u > t)) | (tie & (ties + tl.cumsum(ti, 0) - 1 < krem))
            si = sel.to(tl.int32)
            tl.store(dst + taken + tl.cumsum(si, 0) - 1, offs, mask=sel)
            taken += tl.sum(si, 0)
            ties += tl.sum(ti, 0)
        _keep(Thr, Work, row, t, R, NBINS)
        tl.atomic_add(Work + R * NBINS + 5 * R, 1, sem="relaxed")  # whole-row selects this call

    @triton.jit
    def _fallback_kernel(S, N, Thr, Work, Out, C, K, n_init, n_local, rs_b, rs_h, M, R, H: tl.constexpr,
                         NBINS: tl.constexpr, FB: tl.constexpr, STATIC: tl.constexpr):
        """(row): the whole-row select of a row whose threshold missed (``split``: the pick left it), with its
        own, larger programs; other rows return at once."""
        row = tl.program_id(0)
        n, hi, kk = _span(N, K, n_init, n_local)
        d, krem = _walk(tl.load(Work + row.to(tl.int64) * NBINS + tl.arange(0, NBINS)), kk, NBINS)
        if (kk > 0) & ((d < 0) | (d >= NBINS - 1)):
            dst = Out + row.to(tl.int64) * M
            if STATIC:
                dst += n_init + n_local
            _whole_row(S + (row // H).to(tl.int64) * rs_b + (row % H) * rs_h, dst, Thr, Work, row, kk, n_init, hi, C,
                       R, NBINS, FB)


def work_size(rows: int) -> int:
    """int32 elements of one call's work buffer, zeroed before the call (e.g. a slice of a buffer zeroed once per
    step): the rows' histograms, candidate / tie / taken counters, the threshold and |q| used, a whole-row count,
    finished filter programs (``one``)."""
    return rows * (NB + 6) + 1


def slow_rows(work: torch.Tensor, rows: int) -> torch.Tensor:
    """How many rows of the call that filled ``work`` took the whole-row path (a 1-element view)."""
    return work[rows * (NB + 5) : rows * (NB + 5) + 1]


def _buffers(s_shape, device, k, n_init, n_local, thr, work, cand, out, static, cap, sizes):
    b, h, c = s_shape
    r = b * h
    if c >= 1 << 23:
        raise ValueError(f"prev_select_triton: rows of {c} scores (at most 2^23: positions are packed with 8 bits)")
    for name, v in (("cap", cap), *sizes.items()):
        if v < 1 or v & (v - 1):
            raise ValueError(f"prev_select_triton: {name}={v} must be a power of two")
    if sizes["part"] > cap:
        raise ValueError(f"prev_select_triton: part {sizes['part']} > cap {cap}")
    if thr.dtype != torch.int32 or thr.numel() != r or not thr.is_contiguous():
        raise ValueError(f"prev_select_triton: thr must be contiguous int32 [{r}], got {thr.dtype} {tuple(thr.shape)}")
    ns = n_init + n_local if static else 0
    out = torch.empty(r, ns + k, dtype=torch.int32, device=device) if out is None else out
    if out.dtype != torch.int32 or out.shape[0] != r or out.shape[1] < ns + k or out.stride(1) != 1:
        raise ValueError(f"prev_select_triton: out must be int32 [{r}, >= {ns + k}] with contiguous rows")
    work = torch.zeros(work_size(r), dtype=torch.int32, device=device) if work is None else work
    cand = torch.empty(r * cap, dtype=torch.int32, device=device) if cand is None else cand
    if work.numel() < work_size(r) or cand.numel() < r * cap:
        raise ValueError(f"prev_select_triton: work needs {work_size(r)} and cand {r * cap} int32 elements")
    return r, ns, out, work, cand


def _pick(s, n, k, n_init, n_local, thr, work, cand, out, r, ns, static, cap, part, block, pick_warps,
          split: int = 0):
    _pick_kernel[(r, cap // part)](s, n, thr, work, cand, out, s.shape[2], k, n_init, n_local, s.stride(0),
                                   s.stride(1), out.stride(0), r, H=s.shape[1], CAP=cap, CB=part, NBINS=NB,
                                   FB=block, STATIC=static, NSP=max(2, triton.next_power_of_2(max(ns, 1))),
                                   KP=max(2, triton.next_power_of_2(max(k, 1))), SPLIT=1 if split else 0,
                                   num_warps=pick_warps)
    if split:  # the rows whose threshold missed, one program of ``split`` warps each
        _fallback_kernel[(r,)](s, n, thr, work, out, s.shape[2], k, n_init, n_local, s.stride(0), s.stride(1),
                               out.stride(0), r, H=s.shape[1], NBINS=NB, FB=max(block, 256 * split),
                               STATIC=static, num_warps=split)
    return out


def prev_select_triton(s: torch.Tensor, n: torch.Tensor, k: int, n_init: int, n_local: int, thr: torch.Tensor,
                       q: torch.Tensor | None = None, group: bool = False, work: torch.Tensor | None = None,
                       cand: torch.Tensor | None = None, out: torch.Tensor | None = None, static: bool = True,
                       margin: int = 16, cap: int = 16384, chunk: int = 4096, part: int = 1024, block: int = 1024,
                       num_warps: int = 8, pick_warps: int = 4, atomic: bool = True, one: bool = False,
                       split: int = 0, filter_only: bool = False, loop: int = 1) -> torch.Tensor:
    """s bfloat16 [B, H, C] scores (last dim contiguous); n [1] the valid length; thr int32 [B * H] the rows'
    thresholds (zeros at first; updated in place); q [B, Hq, 1, D] the queries the scores came from (Hq = H, or
    a multiple of H with ``group``: rows scaled by their group's largest |q|; None: |q| = 1) -> int32
    [B * H, (n_init + n_local if static) + k]: the indices of the ``min(k, rows)`` largest scores among positions
    [n_init, n - n_local), unordered, -1 in unused slots. ``work``: ``work_size`` zeroed int32 elements, ``cand``:
    int32 [B * H * cap] scratch (allocated when not given). ``margin``: bfloat16 steps (16: ~6-12 %) below the
    k-th largest score predicted from the previous step (its value per unit of |q|, times this step's |q|);
    ``chunk`` / ``part`` (powers of two): scores per filter program, candidates per pick program (cap / part pick
    programs per row); ``block``: scores per iteration of the whole-row path; ``atomic``: the filter counts its
    candidates with one atomic each (faster on the H200: 4.33 vs 4.60 ms per 32-layer step at 131K) instead of
    ``tl.histogram``; ``filter_only``: the first launch alone (benchmarks); ``loop``: chunks per filter program;
    ``one``: one launch, the last filter program of
    each row to finish picks for it (``part`` candidates at a time); ``split`` (warps, 0: off): rows whose
    threshold missed take the whole-row path in a third launch of ``split``-warp programs (else in the pick's
    first program of the row)."""
    if s.dtype != torch.bfloat16 or s.stride(2) != 1:
        raise ValueError(f"prev_select_triton: scores must be bfloat16 with a contiguous last dimension, got "
                         f"{s.dtype} {tuple(s.shape)} strides {s.stride()}")
    b, h, c = s.shape
    g, d = (q.shape[1] // h, q.shape[-1]) if q is not None else (1, 16)
    if q is not None and (q.shape[0] != b or q.shape[1] != g * h or (g > 1 and not group)):
        raise ValueError(f"prev_select_triton: queries {tuple(q.shape)} do not match scores {tuple(s.shape)} "
                         f"(group={group})")
    r, ns, out, work, cand = _buffers(s.shape, s.device, k, n_init, n_local, thr, work, cand, out, static, cap,
                                      dict(chunk=chunk, part=part, block=block))
    qq = q.reshape(-1, d).contiguous() if q is not None else s
    pick = dict(Out=out, M=out.stride(0), CB=part, FB=block, STATIC=static, NSP=max(2, triton.next_power_of_2(max(ns, 1))),
                KP=max(2, triton.next_power_of_2(max(k, 1))), ONE=True) if one else {}
    _filter_kernel[(r, triton.cdiv(max(c, 1), chunk * loop))](
        s, qq, n, thr, work, cand, c, k, n_init, n_local, s.stride(0), s.stride(1), r, int(margin), H=h, CH=chunk,
        CAP=cap, NBINS=NB, ATOMIC=atomic, G=g, GP=max(2, triton.next_power_of_2(g)), D=d, GROUP=group,
        HASQ=q is not None, **pick, LOOP=loop, num_warps=num_warps)
    if one or filter_only:
        return out
    return _pick(s, n, k, n_init, n_local, thr, work, cand, out, r, ns, static, cap, part, block, pick_warps, split)
