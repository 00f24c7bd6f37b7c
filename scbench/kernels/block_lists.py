"""FlexAttention block lists of a line pattern, built in one Triton launch (the GPU path of ``flex.block_mask`` and
of the gathered-columns mask in ``flex._gathered_cols``).

A line pattern's block of query rows ``qb`` x key block ``kb`` is classified from prefix sums of the chosen diagonals
(how many cross the block) and per-key-block facts (whole, any / all columns chosen), and FlexAttention needs, per
(head, query block), the partial blocks and the full blocks as ordered lists. The torch version (``flex.block_mask``
with ``flex._ordered``) materialises [P, nq, nk] int64 geometry, two gathers from the prefix table and two stable
argsorts: 3.5 ms per layer at 131,072 tokens on an H200 (``scripts/profile_vs_prefill.py``). Here one program per
(head, query block) classifies its row of key blocks and writes both lists by prefix sums: chosen blocks first in
ascending order, then the others ascending, exactly what the stable argsort gives (tests/unit/test_block_lists.py
compares them entry for entry, on CPU in Triton's interpreter and on CUDA).
"""
from __future__ import annotations

import torch

from scbench.kernels.paged_decode import triton

CHUNK = 256
"""Key blocks a program classifies at once (32,768 keys); longer rows loop."""

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _classify(kb, inb, p, pmin, pmax, qwhole, cum_row, T, Jmin, Jmax, KWhole, KAny, KFull, kstride,
                  GATHERED: tl.constexpr):
        """(partial, full) flags of key blocks ``kb`` for the program's query block."""
        kbase = p.to(tl.int64) * kstride
        jmin = tl.load(Jmin + kbase + kb, mask=inb, other=0)
        jmax = tl.load(Jmax + kbase + kb, mask=inb, other=0)
        kwhole = tl.load(KWhole + kbase + kb, mask=inb, other=0) != 0
        kany = tl.load(KAny + kbase + kb, mask=inb, other=0) != 0
        dmin = pmin - jmax
        dmax = pmax - jmin
        lo = tl.minimum(tl.maximum(dmin, 0), T)
        hi = tl.minimum(tl.maximum(dmax + 1, 0), T)
        n_d = tl.load(cum_row + hi, mask=inb, other=0) - tl.load(cum_row + lo, mask=inb, other=0)
        if GATHERED:
            full = qwhole & kwhole & (dmin >= 0) & (n_d == 0)
            partial = (dmax >= 0) & kany & (~full)
        else:
            kfull = tl.load(KFull + kbase + kb, mask=inb, other=0) != 0
            full = qwhole & kwhole & (dmin >= 0) & ((n_d == dmax - dmin + 1) | kfull)
            partial = (dmax >= 0) & ((n_d > 0) | kany) & (~full)
        return partial & inb, full & inb

    @triton.jit
    def _put(I, row, kb, chosen, other, base_c, base_o):
        """Chosen blocks at base_c.. in order, the other valid ones at base_o.. in order."""
        c = chosen.to(tl.int32)
        o = other.to(tl.int32)
        at_c = base_c + tl.cumsum(c, 0) - c
        at_o = base_o + tl.cumsum(o, 0) - o
        tl.store(I + row + at_c, kb, mask=chosen)
        tl.store(I + row + at_o, kb, mask=other)
        return base_c + tl.sum(c, 0), base_o + tl.sum(o, 0)

    @triton.jit(do_not_specialize=["cum_stride", "kstride", "tq", "off", "nq", "nk", "T"])
    def _lists_kernel(Cum, cum_stride, Jmin, Jmax, KWhole, KAny, KFull, kstride, KN, KI, FN, FI,
                      tq, off, nq, nk, T, B: tl.constexpr, CH: tl.constexpr, GATHERED: tl.constexpr):
        p, qb = tl.program_id(0), tl.program_id(1)
        pmin = qb * B + off
        pmax = tl.minimum(qb * B + B - 1, tq - 1) + off
        qwhole = (qb + 1) * B <= tq
        cum_row = Cum + p.to(tl.int64) * cum_stride
        n_part = 0
        n_full = 0
        for c0 in range(0, nk, CH):
            kb = c0 + tl.arange(0, CH)
            inb = kb < nk
            part, full = _classify(kb, inb, p, pmin, pmax, qwhole, cum_row, T, Jmin, Jmax, KWhole, KAny, KFull,
                                   kstride, GATHERED)
            n_part += tl.sum(part.to(tl.int32), 0)
            n_full += tl.sum(full.to(tl.int32), 0)
        row = (p.to(tl.int64) * nq + qb) * nk
        bp, bpo, bf, bfo = 0, n_part, 0, n_full
        for c0 in range(0, nk, CH):
            kb = c0 + tl.arange(0, CH)
            inb = kb < nk
            part, full = _classify(kb, inb, p, pmin, pmax, qwhole, cum_row, T, Jmin, Jmax, KWhole, KAny, KFull,
                                   kstride, GATHERED)
            bp, bpo = _put(KI, row, kb, part, inb & ~part, bp, bpo)
            bf, bfo = _put(FI, row, kb, full, inb & ~full, bf, bfo)
        tl.store(KN + p * nq + qb, n_part)
        tl.store(FN + p * nq + qb, n_full)


def block_lists(cum: torch.Tensor, jmin: torch.Tensor, jmax: torch.Tensor, kwhole: torch.Tensor, kany: torch.Tensor,
                kfull: torch.Tensor | None, *, tq: int, off: int, nq: int, block: int, gathered: bool,
                chunk: int | None = None):
    """Ordered partial and full block lists of a line pattern: (kn [1, P, nq], ki [1, P, nq, nk], fn, fi), int32.

    cum: int32 [P, T + 1], chosen diagonals below each index (T = Tk); jmin / jmax: int32 [P or 1, nk], the first
    and last key position of each key block; kwhole / kany / kfull: [P or 1, nk] per-key-block flags (main pattern:
    the block is whole, has a chosen column, is all chosen columns; gathered columns: all slots valid, first slot
    valid, and kfull unused). Same classification as ``flex.block_mask`` (``gathered=False``) and
    ``flex._gathered_cols`` (``gathered=True``). ``chunk``: key blocks a program classifies at once (a power of two,
    default ``CHUNK``; longer rows loop). One compiled kernel serves every length (no constexpr or integer
    specialisation depends on the shape), so the engine's warm-up on short prompts compiles what a 128K prefill
    runs."""
    p, nk = cum.shape[0], jmin.shape[-1]
    dev = cum.device
    kstride = 0 if jmin.shape[0] == 1 else nk
    if jmin.shape[0] not in (1, p):
        raise ValueError(f"block_lists: key-block tables have {jmin.shape[0]} rows, expected 1 or {p}")
    as32 = [x.to(torch.int32).contiguous() for x in (jmin, jmax)]
    flags = [x.to(torch.int8).contiguous() for x in (kwhole, kany, kfull if kfull is not None else kany)]
    kn = torch.empty(1, p, nq, dtype=torch.int32, device=dev)
    fn = torch.empty_like(kn)
    ki = torch.empty(1, p, nq, nk, dtype=torch.int32, device=dev)
    fi = torch.empty_like(ki)
    ch = chunk or CHUNK
    _lists_kernel[(p, nq)](cum.contiguous(), cum.shape[1], *as32, *flags, kstride, kn, ki, fn, fi,
                           tq, off, nq, nk, cum.shape[1] - 1, B=block, CH=ch, GATHERED=gathered, num_warps=4)
    return kn, ki, fn, fi

