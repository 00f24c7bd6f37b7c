"""Decode attention over a list of selected pages of a static key/value buffer (Quest's fast path).

One query per head attends to the rows of the pages listed for it: ``pages`` [B, Hs, M] holds page indices into
the layer's buffer [B, Hkv, C, D] (-1: an unused slot), each page ``page`` rows long; rows at or beyond ``n``
(the valid length, a device tensor) do not count. ``Hs`` is Hq (every query head has its own list) or Hkv (the
heads of a KV group share one). Nothing is gathered into a new tensor on CUDA: the Triton kernel reads the
listed rows in place (split over the list, online softmax in float32, then merged), so a step reads only the
selected rows. With one list per KV head (Hs = Hkv) one program serves all the group's query heads (each byte read
once). ``paged_attention_torch`` is the reference (any device, also the CPU path): it gathers the rows
and runs a masked softmax. Quest's page bounds and scores, which pick the pages, are in quest_scores.py.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def page_rows(pages: torch.Tensor, page: int, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pages [B, Hs, M] -> (rows [B, Hs, M * page] clamped into the buffer, valid mask of the same shape)."""
    r = torch.arange(page, device=pages.device)
    rows = (pages.clamp(min=0).unsqueeze(-1) * page + r).flatten(-2)
    ok = (pages >= 0).unsqueeze(-1).expand(*pages.shape, page).flatten(-2) & (rows < n)
    return rows, ok


def paged_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, n: torch.Tensor,
                          page: int, scale: float) -> torch.Tensor:
    """q [B, Hq, 1, D]; k, v [B, Hkv, C, D]; pages [B, Hs, M]; n [1] -> [B, Hq, 1, D] (torch ops, no host sync)."""
    b, hq, _, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    hs = pages.shape[1]
    rows, ok = page_rows(pages, page, n)
    m = rows.shape[-1]
    rep = hs // hkv
    idx = rows.view(b, hkv, rep, m, 1).expand(b, hkv, rep, m, d)
    ks = torch.gather(k.unsqueeze(2).expand(b, hkv, rep, c, d), 3, idx).view(b, hs, m, d)
    vs = torch.gather(v.unsqueeze(2).expand(b, hkv, rep, c, d), 3, idx).view(b, hs, m, d)
    qs = q.reshape(b, hs, hq // hs, d).float()
    s = (qs @ ks.float().transpose(-1, -2)) * scale  # [B, Hs, Hq/Hs, M]
    s = s.masked_fill(~ok.unsqueeze(2), float("-inf"))
    o = s.softmax(-1) @ vs.float()
    return o.to(q.dtype).view(b, hq, 1, d)


if triton is not None:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _pdl(PDL: tl.constexpr):
        """Programmatic dependent launch (Hopper+; the kernel launched with ``launch_pdl=True``): wait until the
        previous kernel's writes are visible, then let the next kernel's programs start (they wait the same way)."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _slot_pages(plist, vlist, slot, end, M, pick, cand, TOPK: tl.constexpr, RECENT: tl.constexpr):
        """The page index of each list slot (-1: unused); TOPK applies Quest's rule to ``topk`` output."""
        if TOPK:
            top = slot < M - RECENT
            pg = tl.load(plist + slot, mask=top & (slot < end), other=-1).to(tl.int32)
            val = tl.load(vlist + slot, mask=top & (slot < end), other=float("-inf"))
            pg = tl.where(top, tl.where((slot < pick) & (val > float("-inf")), pg, -1), cand + slot - (M - RECENT))
            pg = tl.where(slot < end, pg, -1)
        else:
            pg = tl.load(plist + slot, mask=slot < end, other=-1).to(tl.int32)
        return pg

    @triton.jit
    def _paged_kernel(Q, K, V, Pages, TopV, N, Part, Mx, Sm, Out, Count, scale, C, M, per_split, n_splits, budget,
                      HQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, D: tl.constexpr,
                      PAGE: tl.constexpr, BP: tl.constexpr, TOPK: tl.constexpr, RECENT: tl.constexpr,
                      ITERS: tl.constexpr, ROWWISE: tl.constexpr, MERGE: tl.constexpr, NS: tl.constexpr,
                      PDL: tl.constexpr = False):
        """One (batch x query head, split of its page list) per program; BP pages (BP * PAGE rows) per iteration.

        TOPK: ``Pages`` / ``TopV`` are ``topk`` indices / values [B, Hs, M - RECENT] of the page scores; slot j is
        used when j < this step's pick count and its score is finite, and the RECENT recent pages follow (Quest's
        rule, computed here from n and ``budget``). Else ``Pages`` is a page list with -1 for unused slots.
        ROWWISE: each row position of the block keeps its own running max / sum / output (no reduction across
        warps inside the loop), merged once at the end. MERGE: ``Count`` [B * Hq] int32 zeros; the last split of
        a head merges the splits into ``Out`` (else ``_combine_kernel`` does). PDL: launched as a programmatic
        dependent (``launch_pdl``): wait for the previous kernel, then let the next one launch."""
        _pdl(PDL)
        bq, sp = tl.program_id(0), tl.program_id(1)
        b, h = bq // HQ, bq % HQ
        kvh = h // (HQ // HKV)
        sel = h // (HQ // HS)
        n = tl.load(N).to(tl.int32)
        r0 = tl.maximum(((n - 1) // PAGE - RECENT + 1) * PAGE, 0)
        cand = r0 // PAGE
        pick = (budget - (n - r0)) // PAGE
        cols = tl.arange(0, D)
        q = tl.load(Q + bq * D + cols).to(tl.float32)
        r = tl.arange(0, BP * PAGE)
        base = (b * HKV + kvh).to(tl.int64) * C * D
        kp, vp = K + base, V + base  # the head's buffers: int32 row offsets inside them (C * D < 2**31)
        plist = Pages + (b * HS + sel).to(tl.int64) * (M - RECENT)
        vlist = TopV + (b * HS + sel).to(tl.int64) * (M - RECENT)
        start = sp * per_split
        end = tl.minimum(start + per_split, M)
        if ROWWISE:
            m_r = tl.full([BP * PAGE], float("-inf"), tl.float32)
            l_r = tl.zeros([BP * PAGE], tl.float32)
            acc2 = tl.zeros([BP * PAGE, D], tl.float32)
            for it in range(ITERS):
                pg = _slot_pages(plist, vlist, start + it * BP + r // PAGE, end, M, pick, cand, TOPK, RECENT)
                rows = pg * PAGE + r % PAGE
                ok = (pg >= 0) & (rows < n)
                off = rows[:, None] * D + cols[None, :]
                k = tl.load(kp + off, mask=ok[:, None], other=0.0).to(tl.float32)
                v = tl.load(vp + off, mask=ok[:, None], other=0.0).to(tl.float32)
                s = tl.where(ok, tl.sum(k * q[None, :], 1) * scale, float("-inf"))
                m_new = tl.maximum(m_r, s)
                alpha = tl.where(m_new > float("-inf"), tl.exp(m_r - m_new), 1.0)
                p = tl.where(ok, tl.exp(s - m_new), 0.0)
                l_r = l_r * alpha + p
                acc2 = acc2 * alpha[:, None] + p[:, None] * v
                m_r = m_new
            m_i = tl.max(m_r, 0)
            w = tl.where(m_r > float("-inf"), tl.exp(m_r - m_i), 0.0)
            total = tl.sum(l_r * w, 0)
            acc = tl.sum(acc2 * w[:, None], 0)
        else:
            m_i = tl.full([], float("-inf"), tl.float32)
            total = tl.full([], 0.0, tl.float32)
            acc = tl.zeros([D], tl.float32)
            for it in range(ITERS):  # per_split // BP blocks (a static count: the interpreter runs it too)
                pg = _slot_pages(plist, vlist, start + it * BP + r // PAGE, end, M, pick, cand, TOPK, RECENT)
                rows = pg * PAGE + r % PAGE
                ok = (pg >= 0) & (rows < n)
                off = rows[:, None] * D + cols[None, :]
                k = tl.load(kp + off, mask=ok[:, None], other=0.0).to(tl.float32)
                s = tl.sum(k * q[None, :], 1) * scale
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 0))
                # a block with no valid row keeps m_new = -inf: guard the rescale against (-inf) - (-inf)
                alpha = tl.where(m_new > float("-inf"), tl.exp(m_i - m_new), 1.0)
                p = tl.where(ok, tl.exp(s - m_new), 0.0)
                v = tl.load(vp + off, mask=ok[:, None], other=0.0).to(tl.float32)
                total = total * alpha + tl.sum(p, 0)
                acc = acc * alpha + tl.sum(p[:, None] * v, 0)
                m_i = m_new
        out = bq * n_splits + sp
        tl.store(Part + out * D + cols, acc)
        tl.store(Mx + out, m_i)
        tl.store(Sm + out, total)
        if MERGE:  # the head's last split to finish merges them (no second kernel); Count is left at 0
            tl.debug_barrier()
            done = tl.atomic_add(Count + bq, 1, sem="acq_rel")
            if done == n_splits - 1:
                sps = tl.arange(0, NS)
                used = sps < n_splits
                mx = tl.load(Mx + bq * n_splits + sps, mask=used, other=float("-inf"), cache_modifier=".cg")
                top = tl.max(mx, 0)
                w = tl.where(mx > float("-inf"), tl.exp(mx - top), 0.0)
                tot = tl.sum(w * tl.load(Sm + bq * n_splits + sps, mask=used, other=0.0, cache_modifier=".cg"), 0)
                part = tl.load(Part + (bq * n_splits + sps)[:, None] * D + cols[None, :], mask=used[:, None],
                               other=0.0, cache_modifier=".cg")
                tl.store(Out + bq * D + cols, (tl.sum(w[:, None] * part, 0) / tot).to(Out.dtype.element_ty))
                tl.atomic_xchg(Count + bq, 0, sem="relaxed")


if triton is not None:

    @triton.jit
    def _paged_group_kernel(Q, K, V, Pages, N, Part, Mx, Sm, scale, C, M, per_split, n_splits,
                            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                            BP: tl.constexpr, ITERS: tl.constexpr, PREC: tl.constexpr):
        """One list per KV head (Hs = Hkv): one (batch x KV head, split) per program attends all G query heads of
        the group over the listed rows with two small matmuls per block, so each key / value byte is read once.
        Partial results are laid out [B * Hkv, splits, GP] for ``_combine_kernel``."""
        bk, sp = tl.program_id(0), tl.program_id(1)
        n = tl.load(N).to(tl.int32)
        cols, g = tl.arange(0, D), tl.arange(0, GP)
        q = tl.load(Q + (bk * G + g)[:, None] * D + cols[None, :], mask=g[:, None] < G, other=0.0)
        r = tl.arange(0, BP * PAGE)
        kp, vp = K + bk.to(tl.int64) * C * D, V + bk.to(tl.int64) * C * D
        plist = Pages + bk.to(tl.int64) * M
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        start = sp * per_split
        end = tl.minimum(start + per_split, M)
        for it in range(ITERS):
            slot = start + it * BP + r // PAGE
            pg = tl.load(plist + slot, mask=slot < end, other=-1).to(tl.int32)
            rows = pg * PAGE + r % PAGE
            ok = (pg >= 0) & (rows < n)
            off = rows[:, None] * D + cols[None, :]
            k = tl.load(kp + off, mask=ok[:, None], other=0.0)
            s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PREC) * scale  # [GP, rows]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.where(m_new > float("-inf"), tl.exp(m_i - m_new), 1.0)
            p = tl.where(ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
            v = tl.load(vp + off, mask=ok[:, None], other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        out = (bk * n_splits + sp) * GP + g
        tl.store(Part + out[:, None] * D + cols[None, :], acc)
        tl.store(Mx + out, m_i)
        tl.store(Sm + out, l_i)


def paged_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, n: torch.Tensor,
                           page: int, scale: float, pages_per_split: int = 16, block_pages: int | None = None,
                           top_values: torch.Tensor | None = None, budget: int = 0, recent: int = 0,
                           num_warps: int = 4, rowwise: bool = False, grouped: bool = True,
                           counter: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """The Triton kernel (CUDA); same contract as ``paged_attention_torch``. With ``top_values``, ``pages`` are
    ``topk`` page indices [B, Hs, K] and the kernel applies Quest's pick count (``budget``) and adds the ``recent``
    pages itself (``quest_scores.quest_page_list`` is the same rule in torch ops). One list per KV head (Hs = Hkv) and
    ``grouped``: the group kernel (each byte read once for all the group's query heads). ``counter``: int32
    zeros, >= B * Hq entries, owned by the caller (left at zero): the splits merge inside the kernel (no second
    launch; one list per query head only). ``pdl``: launched as a programmatic dependent (CUDA, Hopper+)."""
    from scbench.kernels.combine import _combine_kernel

    b, hq, _, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    hs, m = pages.shape[1], pages.shape[2] + (recent if top_values is not None else 0)
    bp = block_pages or max(1, 64 // page)
    per = max(bp, -(-pages_per_split // bp) * bp)
    n_splits = max(1, -(-m // per))
    q2 = q.reshape(b * hq, d).contiguous()
    if grouped and hs == hkv and top_values is None:
        return _paged_grouped(q2, k, v, pages.contiguous(), n, page, scale, bp, per, n_splits, m, num_warps, b, hq)
    part = torch.empty(b * hq * n_splits, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b * hq * n_splits, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty(b * hq, d, dtype=q.dtype, device=q.device)
    topk = top_values is not None
    merge = counter is not None
    if merge and (counter.dtype != torch.int32 or counter.numel() < b * hq):
        raise ValueError(f"paged_attention_triton: counter must be int32 zeros with >= {b * hq} entries")
    ns = max(2, triton.next_power_of_2(n_splits))
    _paged_kernel[(b * hq, n_splits)](q2, k, v, pages.contiguous(), top_values.contiguous() if topk else pages, n, part,
                                      mx, sm, out, counter if merge else mx, scale, c, m, per, n_splits, budget, HQ=hq,
                                      HKV=hkv, HS=hs, D=d, PAGE=page, BP=bp, TOPK=topk, RECENT=recent if topk else 0,
                                      ITERS=per // bp, ROWWISE=rowwise, MERGE=merge, NS=ns, num_warps=num_warps,
                                      **pdl_args(pdl))
    if not merge:
        _combine_kernel[(b * hq, 1)](part, mx, sm, out, n_splits, G=1, GP=1, D=d, NS=ns)
    return out.view(b, hq, 1, d)


def _paged_grouped(q2, k, v, pages, n, page, scale, bp, per, n_splits, m, num_warps, b, hq):
    from scbench.kernels.combine import _combine_kernel

    hkv, c, d = k.shape[1], k.shape[2], k.shape[3]
    g = hq // hkv
    gp = max(16, triton.next_power_of_2(g))
    bp = max(bp, -(-16 // page))  # the matmuls need 16 rows per block
    per = max(bp, -(-per // bp) * bp)
    n_splits = max(1, -(-m // per))
    part = torch.empty(b * hkv * n_splits * gp, d, dtype=torch.float32, device=q2.device)
    mx = torch.empty(b * hkv * n_splits * gp, dtype=torch.float32, device=q2.device)
    sm = torch.empty_like(mx)
    out = torch.empty(b * hq, d, dtype=q2.dtype, device=q2.device)
    _paged_group_kernel[(b * hkv, n_splits)](q2, k, v, pages, n, part, mx, sm, scale, c, m, per, n_splits, G=g, GP=gp,
                                             D=d, PAGE=page, BP=bp, ITERS=per // bp,
                                             PREC="ieee" if k.dtype == torch.float32 else "tf32", num_warps=num_warps)
    _combine_kernel[(b * hkv, g)](part, mx, sm, out, n_splits, G=g, GP=gp, D=d,
                                  NS=max(2, triton.next_power_of_2(n_splits)))
    return out.view(b, hq, 1, d)


def triton_on(t: torch.Tensor) -> bool:
    """A Triton kernel runs for this tensor: CUDA with Triton (CPU tensors only in tests, under TRITON_INTERPRET=1,
    by calling the kernel directly)."""
    return triton is not None and t.is_cuda


def pdl_args(pdl: bool) -> dict:
    """A kernel's launch options for programmatic dependent launch (its ``PDL`` constexpr and ``launch_pdl``)."""
    return {"PDL": True, "launch_pdl": True} if pdl else {}


def paged_attention(q, k, v, pages, n, page: int, scale: float, **tune) -> torch.Tensor:
    """Triton on CUDA (``tune``: its split / block / warp sizes), the torch reference elsewhere."""
    if q.is_cuda and triton is not None:
        return paged_attention_triton(q, k, v, pages, n, page, scale, **tune)
    return paged_attention_torch(q, k, v, pages, n, page, scale)
