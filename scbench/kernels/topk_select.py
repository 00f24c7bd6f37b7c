"""Exact top-k selection on the device without a sort, for RetrievalAttention's captured decode plugins
(methods/retrieval_fast.py, methods/retrieval_batch.py): the k-th largest score is found on the float's
order-preserving integer key, then the rows above it (plus ties up to k) are written out as a compact index list,
-1 in unused slots.

``radix_select_triton``: rows of up to ~1M scores (RetrievalAttention's exact search over every key): one
histogram pass per digit of the key (``digits_for``: 8 + 8 bits for bfloat16 scores, 11 + 11 + 10 else) over
(row, chunk) programs (global atomics), then a compaction pass; rows come out unordered; which of several
exactly-tied scores are taken is unspecified. ``retrieval_scores_triton`` computes the scores and the first pass's
histogram in one kernel. Reference: ``topk`` over the masked scores (``retrieval_fast.RetrievalDecode.rows_torch``).
Quest's page select (the same idea over page scores) is in quest_select.py.
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
                        NSP: tl.constexpr, LOW: tl.constexpr = 0):
        """(row, chunk): write the indices of the selected rows into Out[row, :K] (unordered); -1 past kk.
        STATIC: Out[row] is [the n_init first rows, the n_local last rows, the K selected] (RetrievalAttention's
        list; a static row not valid yet, or below n_init, is -1). LOW: the key bits below the last digit (16 for
        bfloat16's two passes), cleared before comparing with the k-th key (a negative score's key has them set)."""
        row, ch = tl.program_id(0), tl.program_id(1)
        u, ok, offs, kk = _load_keys(S, N, C, K, n_init, n_local, rs_b, rs_h, row, ch, H, CH)
        u = (u >> LOW) << LOW
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
                          NSP=max(2, triton.next_power_of_2(ns)), LOW=shifts[-1], num_warps=num_warps)
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
