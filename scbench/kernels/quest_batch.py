"""Quest decode for a batch of rows over one shared context (CUDA; CPU tensors in Triton's interpreter).

Row b sees the shared context's first ``nctx[b]`` rows (keys [1, Hkv, C, D], read in place) followed by its own
rows (keys [B, Hkv, Co, D]: row ``nctx[b] + j`` of its sequence is own row j); ``at[b]`` is its newest own row, so
it holds ``n[b] = nctx[b] + at[b] + 1`` rows. Pages are those of each row's own sequence (rows ``16 i ..``): the
context's full pages below ``pc[b] = nctx[b] // page`` have shared bounds [1, Hkv, PS, D] (scored for every row in
one program per KV head and page block: each bound read once for the batch), pages from ``pc[b]`` on have the row's
own bounds [B, Hkv, OP, D] (own page j is page ``pc[b] + j``; the first may also hold context rows).

- ``batch_scores_triton``: the page scores [B, Hq, PT] of every row (-inf: not a candidate, as
  ``quest_scores.quest_scores_triton``), the own bounds first updated with each row's new key.
- ``batch_paged_triton``: attention of each row's query heads over their listed pages, rows below ``nctx[b]``
  read from the shared buffer and the rest from the row's own (``paged_decode._paged_kernel``'s math; the splits
  merge in the kernel).

``methods/quest_batch.batch_pages_torch`` / ``batch_attention_torch`` are the references (any device): the same scores by
``quest_scores.page_scores`` and a gather + masked softmax.
"""
from __future__ import annotations

import torch

from scbench.kernels.paged_decode import triton
from scbench.kernels.quest_scores import page_scores

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _row_lengths(NCTX, AT, b, PAGE: tl.constexpr, RECENT: tl.constexpr):
        nctx = tl.load(NCTX + b).to(tl.int32)
        n = nctx + tl.load(AT + b).to(tl.int32) + 1
        return nctx, n, nctx // PAGE, tl.maximum((n - 1) // PAGE - RECENT + 1, 0)

    @triton.jit
    def _shared_scores_kernel(Q, KMin, KMax, S, NCTX, AT, PS, PT, NQ, HQ: tl.constexpr, G: tl.constexpr,
                              GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BP: tl.constexpr,
                              RECENT: tl.constexpr, PREC: tl.constexpr):
        """(KV head, block of BP shared pages): the bound scores of every row's G query heads (NQ = B * G rows)."""
        h, pb = tl.program_id(0), tl.program_id(1)
        cols, rows = tl.arange(0, D), tl.arange(0, GP)
        pages = pb * BP + tl.arange(0, BP)
        inside = pages < PS
        off = (h * PS + pages)[:, None].to(tl.int64) * D + cols[None, :]
        lo = tl.load(KMin + off, mask=inside[:, None], other=0.0)
        hi = tl.load(KMax + off, mask=inside[:, None], other=0.0)
        b, g = rows // G, rows % G
        qrow = b * HQ + h * G + g
        q = tl.load(Q + qrow[:, None] * D + cols[None, :], mask=rows[:, None] < NQ, other=0.0)
        zero = tl.zeros([GP, D], q.dtype)
        s = tl.dot(tl.maximum(q, zero).to(hi.dtype), tl.trans(hi), input_precision=PREC)
        s += tl.dot(tl.minimum(q, zero).to(lo.dtype), tl.trans(lo), input_precision=PREC)
        real = rows < NQ
        nctx = tl.load(NCTX + b, mask=real, other=0).to(tl.int32)
        n = nctx + tl.load(AT + b, mask=real, other=0).to(tl.int32) + 1
        cand = tl.maximum((n - 1) // PAGE - RECENT + 1, 0)
        s = tl.where(pages[None, :] < cand[:, None], s, float("-inf"))
        mine = real[:, None] & (pages[None, :] < (nctx // PAGE)[:, None])  # later pages: the row's own bounds
        tl.store(S + qrow[:, None].to(tl.int64) * PT + pages[None, :], s, mask=mine)

    @triton.jit
    def _own_scores_kernel(Q, KO, OMin, OMax, S, NCTX, AT, OP, PT, CO, HQ: tl.constexpr, HKV: tl.constexpr,
                           G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, OPB: tl.constexpr,
                           RECENT: tl.constexpr, PREC: tl.constexpr):
        """(row x KV head): fold the row's new key into its own page's bounds, then score its own pages."""
        bk = tl.program_id(0)
        b, h = bk // HKV, bk % HKV
        nctx, n, pc, cand = _row_lengths(NCTX, AT, b, PAGE, RECENT)
        at = tl.load(AT + b).to(tl.int32)
        cols = tl.arange(0, D)
        base = bk.to(tl.int64) * OP * D
        row = nctx + at
        pg = row // PAGE - pc
        knew = tl.load(KO + bk.to(tl.int64) * CO * D + at * D + cols)
        first = (row % PAGE) == 0
        lo = tl.load(OMin + base + pg * D + cols)
        hi = tl.load(OMax + base + pg * D + cols)
        tl.store(OMin + base + pg * D + cols, tl.where(first, knew, tl.minimum(lo, knew)))
        tl.store(OMax + base + pg * D + cols, tl.where(first, knew, tl.maximum(hi, knew)))
        tl.debug_barrier()
        j = tl.arange(0, OPB)
        off = base + j[:, None] * D + cols[None, :]
        lo = tl.load(OMin + off, mask=(j < OP)[:, None], other=0.0)
        hi = tl.load(OMax + off, mask=(j < OP)[:, None], other=0.0)
        rows = tl.arange(0, GP)
        q = tl.load(Q + (b * HQ + h * G + rows)[:, None] * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        zero = tl.zeros([GP, D], q.dtype)
        s = tl.dot(tl.maximum(q, zero).to(hi.dtype), tl.trans(hi), input_precision=PREC)
        s += tl.dot(tl.minimum(q, zero).to(lo.dtype), tl.trans(lo), input_precision=PREC)
        a = pc + j
        s = tl.where((a < cand)[None, :], s, float("-inf"))
        tl.store(S + (b * HQ + h * G + rows)[:, None].to(tl.int64) * PT + a[None, :], s,
                 mask=(rows < G)[:, None] & ((j < OP) & (a < PT))[None, :])

    @triton.jit
    def _batch_paged_kernel(Q, SK, SV, OK, OV, Pages, NCTX, AT, Part, Mx, Sm, Out, Count, scale, SHS, CO, M, per_split,
                            n_splits, HQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, D: tl.constexpr,
                            PAGE: tl.constexpr, BP: tl.constexpr, ITERS: tl.constexpr, NS: tl.constexpr):
        """(row x query head, split of its page list): ``paged_decode._paged_kernel`` (elementwise, merged in the
        kernel) with each key / value row read from the shared buffer below nctx[b], from the row's own above."""
        bq, sp = tl.program_id(0), tl.program_id(1)
        b, h = bq // HQ, bq % HQ
        kvh = h // (HQ // HKV)
        sel = h // (HQ // HS)
        nctx = tl.load(NCTX + b).to(tl.int32)
        n = nctx + tl.load(AT + b).to(tl.int32) + 1
        cols = tl.arange(0, D)
        q = tl.load(Q + bq * D + cols).to(tl.float32)
        r = tl.arange(0, BP * PAGE)
        sbase = kvh.to(tl.int64) * SHS  # the shared buffer's head stride: a view of a longer reserve
        obase = (b * HKV + kvh).to(tl.int64) * CO * D
        plist = Pages + (b * HS + sel).to(tl.int64) * M
        start = sp * per_split
        end = tl.minimum(start + per_split, M)
        m_i = tl.full([], float("-inf"), tl.float32)
        total = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([D], tl.float32)
        for it in range(ITERS):
            slot = start + it * BP + r // PAGE
            pg = tl.load(plist + slot, mask=slot < end, other=-1).to(tl.int32)
            rows = pg * PAGE + r % PAGE
            ok = (pg >= 0) & (rows < n)
            shared = rows < nctx
            off = tl.where(shared, sbase + rows * D, obase + (rows - nctx) * D)[:, None] + cols[None, :]
            ks = tl.load(SK + off, mask=(ok & shared)[:, None], other=0.0).to(tl.float32)
            ko = tl.load(OK + off, mask=(ok & ~shared)[:, None], other=0.0).to(tl.float32)
            s = tl.sum((ks + ko) * q[None, :], 1) * scale
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            alpha = tl.where(m_new > float("-inf"), tl.exp(m_i - m_new), 1.0)
            p = tl.where(ok, tl.exp(s - m_new), 0.0)
            vs = tl.load(SV + off, mask=(ok & shared)[:, None], other=0.0).to(tl.float32)
            vo = tl.load(OV + off, mask=(ok & ~shared)[:, None], other=0.0).to(tl.float32)
            total = total * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * (vs + vo), 0)
            m_i = m_new
        out = bq * n_splits + sp
        tl.store(Part + out * D + cols, acc)
        tl.store(Mx + out, m_i)
        tl.store(Sm + out, total)
        tl.debug_barrier()
        done = tl.atomic_add(Count + bq, 1, sem="acq_rel")
        if done == n_splits - 1:  # the head's last split merges them; Count is left at 0
            sps = tl.arange(0, NS)
            used = sps < n_splits
            mx = tl.load(Mx + bq * n_splits + sps, mask=used, other=float("-inf"), cache_modifier=".cg")
            top = tl.max(mx, 0)
            w = tl.where(mx > float("-inf"), tl.exp(mx - top), 0.0)
            tot = tl.sum(w * tl.load(Sm + bq * n_splits + sps, mask=used, other=0.0, cache_modifier=".cg"), 0)
            part = tl.load(Part + (bq * n_splits + sps)[:, None] * D + cols[None, :], mask=used[:, None], other=0.0,
                           cache_modifier=".cg")
            tl.store(Out + bq * D + cols, (tl.sum(w[:, None] * part, 0) / tot).to(Out.dtype.element_ty))
            tl.atomic_xchg(Count + bq, 0, sem="relaxed")


def batch_scores_triton(q, own_k, smin, smax, omin, omax, nctx, at, s, page: int, recent: int,
                        block_pages: int = 64, num_warps: int = 4) -> torch.Tensor:
    """q [B, Hq, 1, D]; own keys [B, Hkv, Co, D] (the new key at row ``at[b]``); shared bounds [1, Hkv, PS, D]; own
    bounds [B, Hkv, OP, D] (updated in place); nctx, at int [B]; s float32 [B, Hq, PT] (PT >= PS + OP), -inf where
    neither kernel writes (set once by the caller) -> s: each row's page scores, -inf past its candidates."""
    b, hq, _, d = q.shape
    hkv, ps, op = smin.shape[1], smin.shape[2], omin.shape[2]
    g = hq // hkv
    pt = s.shape[2]
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    q2 = q.reshape(b * hq, d)
    if ps:
        _shared_scores_kernel[(hkv, triton.cdiv(ps, block_pages))](
            q2, smin, smax, s, nctx, at, ps, pt, b * g, HQ=hq, G=g, GP=max(16, triton.next_power_of_2(b * g)), D=d,
            PAGE=page, BP=block_pages, RECENT=recent, PREC=prec, num_warps=num_warps)
    _own_scores_kernel[(b * hkv,)](q2, own_k, omin, omax, s, nctx, at, op, pt, own_k.shape[2], HQ=hq, HKV=hkv, G=g,
                                   GP=max(16, triton.next_power_of_2(g)), D=d, PAGE=page,
                                   OPB=max(16, triton.next_power_of_2(op)), RECENT=recent, PREC=prec,
                                   num_warps=num_warps)
    return s


def batch_paged_triton(q, shared_k, shared_v, own_k, own_v, pages, nctx, at, scale: float, page: int,
                       counter: torch.Tensor, pages_per_split: int = 16, block_pages: int | None = None,
                       num_warps: int = 4) -> torch.Tensor:
    """q [B, Hq, 1, D]; shared k/v [1, Hkv, C, D] (a view of a longer buffer is fine: its head stride is read); own k/v [B, Hkv, Co, D]; pages int32 [B, Hs, M] (-1: unused)
    in each row's page numbering; nctx, at [B]; counter: int32 zeros, >= B * Hq (left at 0) -> [B, Hq, 1, D]."""
    b, hq, _, d = q.shape
    hkv = shared_k.shape[1]
    hs, m = pages.shape[1], pages.shape[2]
    bp = block_pages or max(1, 64 // page)
    per = max(bp, -(-pages_per_split // bp) * bp)
    n_splits = max(1, -(-m // per))
    if counter.dtype != torch.int32 or counter.numel() < b * hq:
        raise ValueError(f"batch_paged_triton: counter must be int32 zeros with >= {b * hq} entries")
    if shared_k.stride() != shared_v.stride() or shared_k.stride()[2:] != (d, 1):
        raise ValueError(f"batch_paged_triton: shared keys / values need equal strides with contiguous rows, got "
                         f"{shared_k.stride()} / {shared_v.stride()}")
    if not (own_k.is_contiguous() and own_v.is_contiguous()):
        raise ValueError("batch_paged_triton: the own key / value buffers must be contiguous")
    part = torch.empty(b * hq * n_splits, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b * hq * n_splits, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty(b * hq, d, dtype=q.dtype, device=q.device)
    _batch_paged_kernel[(b * hq, n_splits)](
        q.reshape(b * hq, d).contiguous(), shared_k, shared_v, own_k, own_v, pages.contiguous(), nctx, at, part, mx, sm,
        out, counter, scale, shared_k.stride(1), own_k.shape[2], m, per, n_splits, HQ=hq, HKV=hkv, HS=hs, D=d, PAGE=page,
        BP=bp, ITERS=per // bp, NS=max(2, triton.next_power_of_2(n_splits)), num_warps=num_warps)
    return out.view(b, hq, 1, d)


def row_keys(shared: torch.Tensor, own: torch.Tensor, nctx: int, n: int) -> torch.Tensor:
    """Row b's first n keys [1, Hkv, n, D]: the shared context's first ``nctx`` rows, then its own."""
    return torch.cat([shared[:, :, :nctx], own[:, :, : n - nctx]], dim=2)


__all__ = ["batch_scores_triton", "batch_paged_triton", "page_scores", "row_keys"]
