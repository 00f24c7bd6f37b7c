"""Exact top-k selection on the device without a sort, for the captured decode plugins (methods/quest_fast.py,
methods/retrieval_fast.py): the k-th largest score is found on the float's order-preserving integer key, then the
rows above it (plus the lowest-index ties up to k) are written out as a compact index list, -1 in unused slots.

- ``quest_select_triton``: one program per row of page scores [R, P] (P up to ~16K): 32 bisection steps over the
  key bits in registers; the list comes out in ascending page order, followed by the ``recent`` pages. Quest's
  pick count (``(budget - (n - r0)) // page``) is computed from n on the device. Reference: ``topk`` +
  ``paged_decode.quest_page_list``.
- ``radix_select_triton``: rows of up to ~1M scores (RetrievalAttention's exact search over every key): three
  11/11/10-bit histogram passes over (row, chunk) programs (global atomics), then a compaction pass; rows come out
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

BITS = (11, 11, 10)
NB = 2048  # histogram bins per pass (the widest digit)

if triton is not None:

    @triton.jit
    def _ukey(x):
        """float32 -> uint32 whose unsigned order is the float order (-inf lowest)."""
        b = x.to(tl.int32, bitcast=True)
        u = tl.where(b < 0, ~b, b | -2147483648)
        return u.to(tl.uint32, bitcast=True)

    @triton.jit
    def _quest_select_kernel(S, N, Out, P, K, budget, NP: tl.constexpr, PAGE: tl.constexpr,
                             RECENT: tl.constexpr, RP: tl.constexpr):
        """Row r of S [R, P] (-inf: not a candidate): the pick largest pages in ascending order, -1 up to K, then
        the RECENT newest pages. Out [R, K + RECENT] int32."""
        r = tl.program_id(0)
        n = tl.load(N).to(tl.int32)
        r0 = tl.maximum(((n - 1) // PAGE - RECENT + 1) * PAGE, 0)
        cand = r0 // PAGE
        pick = (budget - (n - r0)) // PAGE
        offs = tl.arange(0, NP)
        x = tl.load(S + r.to(tl.int64) * P + offs, mask=offs < P, other=float("-inf"))
        fin = x > float("-inf")
        kk = tl.minimum(tl.minimum(pick, K), tl.sum(fin.to(tl.int32), 0))
        b = x.to(tl.int32, bitcast=True)
        key = tl.where(b < 0, b ^ 2147483647, b)  # signed order = float order
        cnt = tl.sum((key >= 0).to(tl.int32), 0)
        ans = tl.where(cnt >= kk, 0, -2147483648)
        for i in tl.static_range(31):
            c = ans + (1 << (30 - i))
            cnt = tl.sum((key >= c).to(tl.int32), 0)
            ans = tl.where(cnt >= kk, c, ans)
        gt = key > ans
        tie = key == ans
        rank = tl.cumsum(tie.to(tl.int32), 0) - tie.to(tl.int32)
        sel = fin & (gt | (tie & (rank < kk - tl.sum(gt.to(tl.int32), 0)))) & (kk > 0)
        pos = tl.cumsum(sel.to(tl.int32), 0) - 1
        base = Out + r.to(tl.int64) * (K + RECENT)
        tl.store(base + pos, offs, mask=sel)
        tl.store(base + offs, tl.full([NP], -1, tl.int32), mask=(offs >= kk) & (offs < K))
        j = tl.arange(0, RP)
        tl.store(base + K + j, cand + j, mask=j < RECENT)


def quest_select_triton(s: torch.Tensor, n: torch.Tensor, page: int, budget: int, recent: int,
                        k: int) -> torch.Tensor:
    """s float32 [B, Hs, P] page scores (-inf: not a candidate); n [1] the valid length -> int32 page list
    [B, Hs, k + recent]: the ``min(pick, k)`` best pages (ascending), -1, then the ``recent`` newest pages."""
    b, hs, p = s.shape
    out = torch.empty(b, hs, k + recent, dtype=torch.int32, device=s.device)
    np_ = max(16, triton.next_power_of_2(p))
    _quest_select_kernel[(b * hs,)](s.contiguous(), n, out, p, k, budget, NP=np_, PAGE=page, RECENT=recent,
                                    RP=max(2, triton.next_power_of_2(recent)),
                                    num_warps=4 if np_ <= 2048 else 8 if np_ <= 8192 else 16)
    return out


if triton is not None:

    @triton.jit
    def _find(Hist, row, R, kk, PASS: tl.constexpr):
        """Walk the histograms of passes 0..PASS-1 of ``row``: (prefix digits of the k-th largest key, how many
        of the rows still to take lie at that prefix)."""
        bins = tl.arange(0, 2048)
        prefix = tl.zeros([], tl.int32)
        krem = kk
        for p in tl.static_range(PASS):
            h = tl.load(Hist + (p * R + row).to(tl.int64) * 2048 + bins)
            suffix = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # rows with digit >= bin
            d = tl.max(tl.where(suffix >= krem, bins, -1), 0)
            krem -= tl.sum(tl.where(bins > d, h, 0), 0)
            prefix = (prefix << (11 - p // 2)) | d
        return prefix, krem

    @triton.jit
    def _valid(N, C, n_init, n_local, offs):
        n = tl.load(N).to(tl.int32)
        return (offs >= n_init) & (offs < n - n_local) & (offs < C)

    @triton.jit
    def _hist_kernel(S, N, Hist, C, R, K, n_init, n_local, rs_b, rs_h, H: tl.constexpr, PASS: tl.constexpr,
                     SHIFT: tl.constexpr, PREV: tl.constexpr, CH: tl.constexpr):
        """(row, chunk): histogram of digit PASS of the keys that match the prefix found so far."""
        row, ch = tl.program_id(0), tl.program_id(1)
        n = tl.load(N).to(tl.int32)
        kk = tl.minimum(K, tl.maximum(n - n_local - n_init, 0))
        offs = ch * CH + tl.arange(0, CH)
        ok = _valid(N, C, n_init, n_local, offs) & (kk > 0)
        x = tl.load(S + (row // H).to(tl.int64) * rs_b + (row % H) * rs_h + offs, mask=ok, other=0.0)
        u = _ukey(x.to(tl.float32))
        if PASS > 0:  # PREV: the shift of the previous digit
            prefix, krem = _find(Hist, row, R, kk, PASS)
            ok &= (u >> PREV).to(tl.int32) == prefix
        d = ((u >> SHIFT) & 2047).to(tl.int32)
        h = tl.histogram(d, 2048, mask=ok)
        bins = tl.arange(0, 2048)
        tl.atomic_add(Hist + (PASS * R + row).to(tl.int64) * 2048 + bins, h, mask=h > 0, sem="relaxed")

    @triton.jit
    def _compact_kernel(S, N, Hist, Cnt, Out, C, R, K, n_init, n_local, rs_b, rs_h, M, H: tl.constexpr,
                        CH: tl.constexpr):
        """(row, chunk): write the indices of the selected rows into Out[row, :K] (unordered); -1 past kk."""
        row, ch = tl.program_id(0), tl.program_id(1)
        n = tl.load(N).to(tl.int32)
        kk = tl.minimum(K, tl.maximum(n - n_local - n_init, 0))
        offs = ch * CH + tl.arange(0, CH)
        ok = _valid(N, C, n_init, n_local, offs) & (kk > 0)
        x = tl.load(S + (row // H).to(tl.int64) * rs_b + (row % H) * rs_h + offs, mask=ok, other=0.0)
        u = _ukey(x.to(tl.float32))
        t, krem = _find(Hist, row, R, kk, 3)
        t = t.to(tl.uint32, bitcast=True)
        gt = ok & (u > t)
        tie = ok & (u == t)
        nt = tl.sum(tie.to(tl.int32), 0)
        tbase = tl.atomic_add(Cnt + 2 * row + 1, nt, sem="relaxed")
        tie &= (tbase + tl.cumsum(tie.to(tl.int32), 0) - 1) < krem
        sel = gt | tie
        base = tl.atomic_add(Cnt + 2 * row, tl.sum(sel.to(tl.int32), 0), sem="relaxed")
        dst = Out + row.to(tl.int64) * M
        tl.store(dst + base + tl.cumsum(sel.to(tl.int32), 0) - 1, offs, mask=sel)
        tl.store(dst + offs, tl.full([CH], -1, tl.int32), mask=(offs >= kk) & (offs < K))  # slots this chunk covers


def radix_select_triton(s: torch.Tensor, n: torch.Tensor, k: int, n_init: int, n_local: int,
                        out: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """s [B, H, C] scores (any float dtype, last dim contiguous); n [1] the valid length -> int32 [B * H, k]:
    the indices of the ``min(k, rows)`` largest scores among positions [n_init, n - n_local), -1 in unused slots
    (or written into the first k columns of ``out`` [B * H, M], int32)."""
    b, h, c = s.shape
    r = b * h
    if s.stride(2) != 1:
        raise ValueError(f"radix_select_triton: scores {tuple(s.shape)} need a contiguous last dimension")
    out = torch.empty(r, k, dtype=torch.int32, device=s.device) if out is None else out
    if out.dtype != torch.int32 or out.shape[0] != r or out.shape[1] < k or out.stride(1) != 1:
        raise ValueError(f"radix_select_triton: out must be int32 [{r}, >= {k}] with contiguous rows")
    work = torch.zeros(3 * r * NB + 2 * r, dtype=torch.int32, device=s.device)
    hist, cnt = work[: 3 * r * NB], work[3 * r * NB :]
    grid = (r, triton.cdiv(max(c, k), chunk))
    args = (s, n, hist, c, r, k, n_init, n_local, s.stride(0), s.stride(1))
    for p in range(3):
        _hist_kernel[grid](*args, H=h, PASS=p, SHIFT=(21, 10, 0)[p], PREV=(0, 21, 10)[p], CH=chunk, num_warps=8)
    _compact_kernel[grid](s, n, hist, cnt, out, c, r, k, n_init, n_local, s.stride(0), s.stride(1), out.stride(0),
                          H=h, CH=chunk, num_warps=8)
    return out
