"""Exact top-k over long score rows in two launches (RetrievalAttention's device tier, methods/retrieval_fast.py):
a sampled threshold first narrows each row to a few thousand candidates, then one program per row selects exactly
among them.

1. ``_filter_kernel`` (row, chunk of CH scores): every program of a row takes the same strided sample of the row's
   searchable scores (NS scores in blocks of SB neighbours) and finds its j-th largest key T, j a few standard
   deviations above the sample's expected share of the top k (``margin``); then it appends the positions of its
   chunk's scores >= T to the row's candidate list (capacity CAP, one atomic per program). Rows no longer than CAP
   take every searchable position (T = the lowest key).
2. ``_final_kernel`` (row): if the row has between kk and CAP candidates, every one of its top kk is among them
   (kk of them are >= T), so the exact k-th largest key and the rows above it (plus ties up to kk) are found among
   the candidates alone: a 4-bit radix search on the key (``_kth``: a 16-bin histogram a step). Else
   (a sample that missed: rare, or CAP too small) the same search runs over the whole row (slow, still exact).

Keys: the float's order-preserving uint32, of which bfloat16 scores use the top 16 bits (BITS). Which of several
exactly-tied scores are taken is unspecified (the candidates' order depends on the atomics). Output: as
``topk_select.radix_select_triton(static=True)``: [the n_init first rows, the n_local last rows, the kk selected,
-1 past kk]. Reference: ``topk`` over the masked scores (``retrieval_fast.RetrievalDecode`` with select=topk);
tests/unit/test_sample_select.py compares the selected score multisets on random rows.
"""
from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _keys(x, BITS: tl.constexpr):
        """float -> uint32 in [0, 2^BITS) whose order is the float order (the float32 key's top BITS bits)."""
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = tl.where((b >> 31) != 0, b ^ 0xFFFFFFFF, b | 0x80000000)
        return u >> (32 - BITS)

    @triton.jit
    def _pick(h, krem):
        """A 16-bin histogram of the next digit among the keys matching the prefix so far -> (the digit holding the
        krem-th largest, how many of the kk are still to take at the longer prefix)."""
        bins = tl.arange(0, 16)
        suffix = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys with this digit or a larger one
        d = tl.max(tl.where(suffix >= krem, bins, 0), 0)
        return d, krem - tl.sum(tl.where(bins > d, h, 0), 0)

    @triton.jit
    def _match(u, t, i: tl.constexpr, BITS: tl.constexpr):
        """Whether u's digits above step i equal t's."""
        if i == 0:
            return u == u
        else:
            return (u >> (BITS - 4 * i)) == (t >> (BITS - 4 * i))

    @triton.jit
    def _kth(u, valid, kk, BITS: tl.constexpr):
        """The kk-th largest key among the valid u (kk >= 1 and at most count(valid); else any key), 4 bits a step
        (a 16-bin histogram of the matching keys' next digit)."""
        t = tl.zeros([], tl.uint32)
        krem = kk
        for i in tl.static_range(BITS // 4):
            h = tl.histogram(((u >> (BITS - 4 * (i + 1))) & 15).to(tl.int32), 16, mask=valid & _match(u, t, i, BITS))
            d, krem = _pick(h, krem)
            t = t | (d.to(tl.uint32) << (BITS - 4 * (i + 1)))
        return t

    @triton.jit
    def _span(N, K, n_init, n_local):
        n = tl.load(N).to(tl.int32)
        hi = n - n_local
        kk = tl.minimum(K, tl.maximum(hi - n_init, 0))
        return n, hi, kk

    @triton.jit
    def _filter_kernel(S, N, Cnt, Cand, C, K, n_init, n_local, rs_b, rs_h, margin, H: tl.constexpr,
                       CH: tl.constexpr, NS: tl.constexpr, SB: tl.constexpr, CAP: tl.constexpr,
                       BITS: tl.constexpr, Out=None, M=0, R=0, FUSE: tl.constexpr = False,
                       STATIC: tl.constexpr = False, NSP: tl.constexpr = 2, KP: tl.constexpr = 2):
        row, ch = tl.program_id(0), tl.program_id(1)
        n, hi, kk = _span(N, K, n_init, n_local)
        m = hi - n_init
        base = S + (row // H).to(tl.int64) * rs_b + (row % H) * rs_h
        # the sample: NS // SB blocks of SB neighbours spread over [n_init, hi)
        i = tl.arange(0, NS)
        blk = (i // SB).to(tl.int64)
        pos = n_init + (blk * m) // (NS // SB) + i % SB
        sok = (pos < hi) & (m > CAP)
        su = _keys(tl.load(base + pos, mask=sok, other=0.0), BITS)
        e = (NS * kk).to(tl.float32) / tl.maximum(m, 1).to(tl.float32)
        j = tl.minimum(tl.ceil(e + margin * tl.sqrt(e) + 8.0).to(tl.int32), NS)
        t = tl.where(m > CAP, _kth(su, sok, j, BITS), 0)
        offs = ch * CH + tl.arange(0, CH)
        ok = (offs >= n_init) & (offs < hi) & (kk > 0)
        u = _keys(tl.load(base + offs, mask=offs < C, other=0.0), BITS)
        cand = ok & (u >= t)
        nc = tl.sum(cand.to(tl.int32), 0)
        at = tl.atomic_add(Cnt + row, nc, sem="relaxed")
        dst = at + tl.cumsum(cand.to(tl.int32), 0) - 1
        tl.store(Cand + row.to(tl.int64) * CAP + dst, offs, mask=cand & (dst < CAP))
        if FUSE:  # the row's last program to finish selects (its acquire sees the others' released stores)
            tl.debug_barrier()  # every thread's stores before the one thread's release
            done = tl.atomic_add(Cnt + R + row, 1, sem="acq_rel", scope="gpu")
            if done == tl.num_programs(1) - 1:
                _finish(base, Cnt, Cand, Out, row, n, hi, kk, C, K, n_init, n_local, M, CAP, BITS, STATIC, NSP, KP)

    @triton.jit
    def _final_kernel(S, N, Cnt, Cand, Out, C, K, n_init, n_local, rs_b, rs_h, M, H: tl.constexpr,
                      CAP: tl.constexpr, BITS: tl.constexpr, STATIC: tl.constexpr, NSP: tl.constexpr,
                      KP: tl.constexpr):
        row = tl.program_id(0)
        n, hi, kk = _span(N, K, n_init, n_local)
        base = S + (row // H).to(tl.int64) * rs_b + (row % H) * rs_h
        _finish(base, Cnt, Cand, Out, row, n, hi, kk, C, K, n_init, n_local, M, CAP, BITS, STATIC, NSP, KP)

    @triton.jit
    def _finish(base, Cnt, Cand, Out, row, n, hi, kk, C, K, n_init, n_local, M, CAP: tl.constexpr,
                BITS: tl.constexpr, STATIC: tl.constexpr, NSP: tl.constexpr, KP: tl.constexpr):
        """Row ``row``'s list from its candidates (loads through L2: in the fused filter, other programs wrote
        them)."""
        dst = Out + row.to(tl.int64) * M
        if STATIC:
            js = tl.arange(0, NSP)
            fixed = tl.where(js < n_init, tl.where(js < n, js, -1), hi + js - n_init)
            fixed = tl.where((js >= n_init) & (fixed < n_init), -1, fixed)
            tl.store(dst + js, fixed, mask=js < n_init + n_local)
            dst += n_init + n_local
        cnt = tl.load(Cnt + row, cache_modifier=".cg")
        if (cnt >= kk) & (cnt <= CAP):
            j = tl.arange(0, CAP)
            valid = (j < cnt) & (kk > 0)
            idx = tl.load(Cand + row.to(tl.int64) * CAP + j, mask=valid, other=0, cache_modifier=".cg")
            u = _keys(tl.load(base + idx, mask=valid, other=0.0), BITS)
            t = _kth(u, valid, kk, BITS)
            gt = valid & (u > t)
            tie = valid & (u == t)
            rank = tl.cumsum(tie.to(tl.int32), 0) - tie.to(tl.int32)
            sel = gt | (tie & (rank < kk - tl.sum(gt.to(tl.int32), 0)))
            tl.store(dst + tl.cumsum(sel.to(tl.int32), 0) - 1, idx, mask=sel)
        else:  # the whole row, CAP scores at a time
            t = tl.zeros([], tl.uint32)
            krem = kk
            for i in tl.static_range(BITS // 4):
                h = tl.zeros([16], tl.int32)
                for c0 in range(0, C, CAP):
                    offs = c0 + tl.arange(0, CAP)
                    ok = (offs >= n_init) & (offs < hi)
                    u = _keys(tl.load(base + offs, mask=offs < C, other=0.0), BITS)
                    h += tl.histogram(((u >> (BITS - 4 * (i + 1))) & 15).to(tl.int32), 16,
                                      mask=ok & _match(u, t, i, BITS))
                d, krem = _pick(h, krem)
                t = t | (d.to(tl.uint32) << (BITS - 4 * (i + 1)))
            ngt = tl.zeros([], tl.int32)
            for c0 in range(0, C, CAP):
                offs = c0 + tl.arange(0, CAP)
                ok = (offs >= n_init) & (offs < hi) & (kk > 0)
                u = _keys(tl.load(base + offs, mask=offs < C, other=0.0), BITS)
                ngt += tl.sum((ok & (u > t)).to(tl.int32), 0)
            taken = tl.zeros([], tl.int32)
            ties = tl.zeros([], tl.int32)
            for c0 in range(0, C, CAP):
                offs = c0 + tl.arange(0, CAP)
                ok = (offs >= n_init) & (offs < hi) & (kk > 0)
                u = _keys(tl.load(base + offs, mask=offs < C, other=0.0), BITS)
                gt = ok & (u > t)
                tie = ok & (u == t)
                trank = ties + tl.cumsum(tie.to(tl.int32), 0) - tie.to(tl.int32)
                sel = gt | (tie & (trank < kk - ngt))
                tl.store(dst + taken + tl.cumsum(sel.to(tl.int32), 0) - 1, offs, mask=sel)
                taken += tl.sum(sel.to(tl.int32), 0)
                ties += tl.sum(tie.to(tl.int32), 0)
        jk = tl.arange(0, KP)
        tl.store(dst + jk, tl.full([KP], -1, tl.int32), mask=(jk >= kk) & (jk < K))


def cap_for(k: int) -> int:
    """Candidate capacity per row: the next power of two of 2k (at least 16)."""
    return max(16, 1 << math.ceil(math.log2(max(2 * k, 1))))


def work_size(rows: int) -> int:
    """int32 elements of the per-call counters (zeroed before the call; e.g. a slice of a buffer zeroed per step):
    each row's candidate count and (``fuse``) how many of its filter programs have finished."""
    return 2 * rows


def sample_select_triton(s: torch.Tensor, n: torch.Tensor, k: int, n_init: int, n_local: int,
                         cnt: torch.Tensor | None = None, cand: torch.Tensor | None = None,
                         out: torch.Tensor | None = None, static: bool = True, chunk: int = 8192,
                         samples: int | None = None, block: int = 8, margin: float = 4.0, num_warps: int = 8,
                         final_warps: int = 16, cap: int | None = None, fuse: bool = False) -> torch.Tensor:
    """s [B, H, C] scores (any float dtype, last dim contiguous); n [1] the valid length -> int32
    [B * H, (n_init + n_local if static) + k]: the indices of the ``min(k, rows)`` largest scores among positions
    [n_init, n - n_local), unordered, -1 in unused slots. ``cnt``: int32 [B * H] zeros (``work_size``), ``cand``:
    int32 [B * H * cap] scratch (allocated when not given). ``chunk`` / ``samples`` / ``block`` (powers of two,
    samples <= cap): the filter's scores per program, sample size (default 4,096, at most ``cap``: ``cap_for(k)`` is
    below that for k < 2,048), sample block length; ``margin``: standard
    deviations of the sample's count above its expected share of the top k (a smaller margin: fewer candidates,
    more whole-row fallbacks). ``fuse``: one launch, the last filter program of each row to finish selects for it
    (``num_warps`` then applies to that step too)."""
    b, h, c = s.shape
    r = b * h
    if s.stride(2) != 1:
        raise ValueError(f"sample_select_triton: scores {tuple(s.shape)} need a contiguous last dimension")
    cap = cap or cap_for(k)
    samples = samples or min(4096, cap)
    for name, v in (("chunk", chunk), ("samples", samples), ("block", block), ("cap", cap)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"sample_select_triton: {name}={v} must be a power of two")
    if samples > cap or block > samples:
        raise ValueError(f"sample_select_triton: need block {block} <= samples {samples} <= cap {cap}")
    ns = n_init + n_local if static else 0
    out = torch.empty(r, ns + k, dtype=torch.int32, device=s.device) if out is None else out
    if out.dtype != torch.int32 or out.shape[0] != r or out.shape[1] < ns + k or out.stride(1) != 1:
        raise ValueError(f"sample_select_triton: out must be int32 [{r}, >= {ns + k}] with contiguous rows")
    cnt = torch.zeros(work_size(r), dtype=torch.int32, device=s.device) if cnt is None else cnt
    cand = torch.empty(r * cap, dtype=torch.int32, device=s.device) if cand is None else cand
    if cnt.numel() < work_size(r) or cand.numel() < r * cap:
        raise ValueError(f"sample_select_triton: cnt needs {work_size(r)} and cand {r * cap} int32 elements")
    bits = 16 if s.dtype == torch.bfloat16 else 32
    args = (s, n, cnt, cand)
    nsp, kp = max(2, triton.next_power_of_2(max(ns, 1))), max(2, triton.next_power_of_2(max(k, 1)))
    fused = dict(Out=out, M=out.stride(0), R=r, FUSE=True, STATIC=static, NSP=nsp, KP=kp) if fuse else {}
    _filter_kernel[(r, triton.cdiv(max(c, 1), chunk))](*args, c, k, n_init, n_local, s.stride(0), s.stride(1),
                                                       float(margin), H=h, CH=chunk, NS=samples, SB=block, CAP=cap,
                                                       BITS=bits, **fused, num_warps=num_warps)
    if fuse:
        return out
    _final_kernel[(r,)](*args, out, c, k, n_init, n_local, s.stride(0), s.stride(1), out.stride(0), H=h, CAP=cap,
                        BITS=bits, STATIC=static, NSP=nsp, KP=kp, num_warps=final_warps)
    return out
