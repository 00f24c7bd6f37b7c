"""RetrievalAttention's exact top-k over bfloat16 score rows in ONE launch (CUDA): ``radix_select_triton``'s two
8-bit histogram passes and its compaction (scbench/kernels/topk_select.py) run in one kernel whose programs of a row
meet at two per-row barriers (an arrival counter in global memory) instead of at kernel boundaries: three launches
and a memset per layer become one, and the programs loop over their share of the row (the scores stay in L2).

Every program of a row must be resident at once (the barrier spins): the grid is at most two programs per SM (4
warps and 128 registers per thread, ptxas for sm_90a: four fit); ``one_launch_ok`` says when a grid qualifies, else
the caller takes ``radix_select_triton``. A barrier gives up after ``SPIN`` polls (a wrong list instead of a hang; never seen).
Same contract and output as ``radix_select_triton(..., static=True)`` for bfloat16 scores; tested against it and
``topk`` (tests/unit/test_topk_select.py; in the interpreter with one program per row).
"""
from __future__ import annotations

import torch

from scbench.kernels import topk_select
from scbench.kernels.topk_select import _plan, _sms, triton

SPIN = 1 << 16
"""Polls of a per-row barrier before it gives up."""

if triton is not None:
    import triton.language as tl

    from scbench.kernels.topk_select import _load_keys, _ukey  # noqa: F401  (jit helpers)

    @triton.jit
    def _row_barrier(Arrive, row, target, SPIN_: tl.constexpr):
        """All programs of ``row`` have arrived ``target`` times in all (each program arrives once per barrier)."""
        tl.debug_barrier()
        tl.atomic_add(Arrive + row, 1, sem="release", scope="gpu")
        c = tl.atomic_add(Arrive + row, 0, sem="acquire", scope="gpu")
        spins = 0
        while (c < target) & (spins < SPIN_):
            c = tl.atomic_add(Arrive + row, 0, sem="acquire", scope="gpu")
            spins += 1
        tl.debug_barrier()

    @triton.jit
    def _walk_cg(Hist, row, R, p, krem, val, S: tl.constexpr, NB: tl.constexpr):
        """``topk_select._walk`` reading the histogram from L2 (other programs' atomics of this launch)."""
        bins = tl.arange(0, NB)
        h = tl.load(Hist + (p * R + row).to(tl.int64) * NB + bins, cache_modifier=".cg")
        suffix = tl.sum(h, 0) - tl.cumsum(h, 0) + h
        d = tl.max(tl.where(suffix >= krem, bins, -1), 0)
        krem -= tl.sum(tl.where(bins > d, h, 0), 0)
        return krem, val | (d.to(tl.uint32) << S)

    @triton.jit
    def _select_kernel(S, N, Hist, Cnt, Arrive, Out, C, R, K, n_init, n_local, rs_b, rs_h, M, H: tl.constexpr,
                       S0: tl.constexpr, S1: tl.constexpr, NB: tl.constexpr, CH: tl.constexpr, ITERS: tl.constexpr,
                       NPROG: tl.constexpr, STATIC: tl.constexpr, NSP: tl.constexpr, SPIN_: tl.constexpr):
        """(row, program p of NPROG): chunks p * ITERS ... of CH scores: histogram of the high digit, barrier,
        histogram of the low digit under the found prefix, barrier, then the compaction (as ``_compact_kernel``)."""
        row, p = tl.program_id(0), tl.program_id(1)
        bins = tl.arange(0, NB)
        h = tl.zeros([NB], tl.int32)
        for it in range(ITERS):
            u, ok, offs, kk = _load_keys(S, N, C, K, n_init, n_local, rs_b, rs_h, row, p * ITERS + it, H, CH)
            h += tl.histogram(((u >> S0) & ((1 << (32 - S0)) - 1)).to(tl.int32), NB, mask=ok)
        tl.atomic_add(Hist + row.to(tl.int64) * NB + bins, h, mask=h > 0, sem="relaxed")
        _row_barrier(Arrive, row, NPROG, SPIN_)
        n = tl.load(N).to(tl.int32)
        kk = tl.minimum(K, tl.maximum(n - n_local - n_init, 0))
        krem, val = _walk_cg(Hist, row, R, 0, kk, tl.zeros([], tl.uint32), S0, NB)
        h = tl.zeros([NB], tl.int32)
        for it in range(ITERS):
            u, ok, offs, kk = _load_keys(S, N, C, K, n_init, n_local, rs_b, rs_h, row, p * ITERS + it, H, CH)
            ok &= (u >> S0) == (val >> S0)
            h += tl.histogram(((u >> S1) & ((1 << (S0 - S1)) - 1)).to(tl.int32), NB, mask=ok)
        tl.atomic_add(Hist + (R + row).to(tl.int64) * NB + bins, h, mask=h > 0, sem="relaxed")
        _row_barrier(Arrive, row, 2 * NPROG, SPIN_)
        krem, t = _walk_cg(Hist, row, R, 1, krem, val, S1, NB)
        dst = Out + row.to(tl.int64) * M
        if STATIC:
            j = tl.arange(0, NSP)
            fixed = tl.where(j < n_init, tl.where(j < n, j, -1), n - n_local + j - n_init)
            fixed = tl.where((j >= n_init) & (fixed < n_init), -1, fixed)
            tl.store(dst + j, fixed, mask=(j < n_init + n_local) & (p == 0))
            dst += n_init + n_local
        for it in range(ITERS):
            u, ok, offs, kk = _load_keys(S, N, C, K, n_init, n_local, rs_b, rs_h, row, p * ITERS + it, H, CH)
            u = (u >> S1) << S1  # the bits below the last digit cleared (a negative score's key has them set)
            gt = ok & (u > t)
            tie = ok & (u == t)
            tbase = tl.atomic_add(Cnt + 2 * row + 1, tl.sum(tie.to(tl.int32), 0), sem="relaxed")
            tie &= (tbase + tl.cumsum(tie.to(tl.int32), 0) - 1) < krem
            sel = gt | tie
            base = tl.atomic_add(Cnt + 2 * row, tl.sum(sel.to(tl.int32), 0), sem="relaxed")
            tl.store(dst + base + tl.cumsum(sel.to(tl.int32), 0) - 1, offs, mask=sel)
            tl.store(dst + offs, tl.full([CH], -1, tl.int32), mask=(offs >= kk) & (offs < K))


def work_size(rows: int) -> int:
    """int32 elements of the one-launch select's zeroed work buffer: two histograms, counters, arrivals."""
    return 2 * rows * 256 + 3 * rows


def programs(rows: int, c: int, chunk: int, device: torch.device) -> int:
    """Programs per row: up to 8, at most two per SM over the grid, never more than the row's chunks."""
    return max(1, min(8, 2 * _sms(device) // max(1, rows), triton.cdiv(c, chunk)))


def one_launch_ok(s: torch.Tensor, chunk: int = 2048) -> bool:
    """Whether ``radix_select_one`` runs these scores: bfloat16 (two 8-bit digits), last dim contiguous, and the grid
    fits two programs per SM with at least one program per row."""
    r = s.shape[0] * s.shape[1]
    return (triton is not None and s.dtype == torch.bfloat16 and s.stride(2) == 1
            and r <= 2 * _sms(s.device))


def radix_select_one(s: torch.Tensor, n: torch.Tensor, k: int, n_init: int, n_local: int, work: torch.Tensor,
                     chunk: int = 2048, num_warps: int = 4, nprog: int | None = None) -> torch.Tensor:
    """``radix_select_triton(s, n, k, n_init, n_local, static=True)`` in one launch: s [B, H, C] bfloat16 scores;
    work: ``work_size(B * H)`` zeroed int32 (left dirty: zero it before the next call) -> int32
    [B * H, n_init + n_local + k]. ``nprog``: programs per row (default ``programs``)."""
    b, h, c = s.shape
    r = b * h
    if not one_launch_ok(s, chunk):
        raise ValueError(f"radix_select_one: scores {tuple(s.shape)} {s.dtype} need bfloat16 rows, contiguous, "
                         f"at most {2 * _sms(s.device)} of them")
    if work.dtype != torch.int32 or work.numel() < work_size(r):
        raise ValueError(f"radix_select_one: work must be int32 zeros with >= {work_size(r)} elements")
    digits, shifts, sh, nb = _plan((8, 8), s.dtype)
    ns = n_init + n_local
    out = torch.empty(r, ns + k, dtype=torch.int32, device=s.device)
    nprog = nprog or programs(r, max(c, k), chunk, s.device)
    iters = triton.cdiv(triton.cdiv(max(c, k), chunk), nprog)
    hist, cnt, arrive = work[: 2 * r * nb], work[2 * r * nb: 2 * r * nb + 2 * r], work[2 * r * nb + 2 * r:]
    _select_kernel[(r, nprog)](s, n, hist, cnt, arrive, out, c, r, k, n_init, n_local, s.stride(0), s.stride(1),
                               out.stride(0), H=h, S0=shifts[0], S1=shifts[1], NB=nb, CH=chunk, ITERS=iters,
                               NPROG=nprog, STATIC=True, NSP=max(2, triton.next_power_of_2(ns)), SPIN_=SPIN,
                               num_warps=num_warps)
    return out


__all__ = ["radix_select_one", "one_launch_ok", "work_size", "programs", "topk_select"]
