"""Quest's decode attention over the union of a KV group's pages (CUDA; CPU tensors in Triton's interpreter).

With ``gqa=head`` every query head lists its own pages; the heads of a KV group often list the same pages (a
real model's heads of a group look alike; on random weights the lists barely overlap). ``paged_union_triton``
takes each head's page map (int8 [B, Hq, P], 1: listed; written by ``quest_select.quest_select_triton(...,
map_out=)``) and runs one program per (batch x KV head, range of pages): the range's union is loaded once and
attended by the heads that listed each page (a per-head mask on the group's two small matmuls, online softmax in
float32), then ``combine._combine_kernel`` merges the ranges. The same selection and math as
``paged_decode.paged_attention_torch`` over the lists (the reference; tests/unit/test_topk_select.py).
"""
from __future__ import annotations

import torch

from scbench.kernels.paged_decode import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _paged_union_kernel(Q, K, V, Map, N, Part, Mx, Sm, Scratch, Out, Count, scale, C, P, n_ranges,
                            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, R: tl.constexpr,
                            BP: tl.constexpr, PREC: tl.constexpr, MERGE: tl.constexpr, NS: tl.constexpr):
        """Per-query-head page maps (``Map`` [B, Hq, P] int8, 1: listed), one (batch x KV head, range of R pages)
        per program: the pages any head of the group listed are loaded once and attended by the heads that listed
        them (a per-head mask on the group's two small matmuls): gqa=head's math, the bytes of the pages' union.
        The range's union is compacted into the program's ``Scratch`` rows (page, head bits), then read back in
        blocks of BP pages. Partial results are laid out as ``_paged_group_kernel``'s. MERGE: ``Count`` [>= B * Hkv]
        int32 zeros; the group's last range to finish merges the ranges into ``Out`` (left at 0; no second kernel)."""
        bk, rg = tl.program_id(0), tl.program_id(1)
        n = tl.load(N).to(tl.int32)
        cols, g = tl.arange(0, D), tl.arange(0, GP)
        pages = rg * R + tl.arange(0, R)
        inside = pages < P
        bits = tl.zeros([R], tl.int32)
        for h in tl.static_range(G):
            mh = tl.load(Map + (bk * G + h).to(tl.int64) * P + pages, mask=inside, other=0)
            bits = bits | ((mh != 0).to(tl.int32) << h)
        u = bits != 0
        pos = tl.cumsum(u.to(tl.int32), 0) - 1
        cnt = tl.sum(u.to(tl.int32), 0)
        sb = Scratch + (bk * n_ranges + rg).to(tl.int64) * (2 * R)
        tl.store(sb + pos, pages, mask=u)
        tl.store(sb + R + pos, bits, mask=u)
        tl.debug_barrier()
        q = tl.load(Q + (bk * G + g)[:, None] * D + cols[None, :], mask=g[:, None] < G, other=0.0)
        r = tl.arange(0, BP * PAGE)
        kp, vp = K + bk.to(tl.int64) * C * D, V + bk.to(tl.int64) * C * D
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        it = cnt * 0
        while it < cnt:
            slot = it + r // PAGE
            used = slot < cnt
            pg = tl.load(sb + slot, mask=used, other=0)
            hb = tl.load(sb + R + slot, mask=used, other=0)
            rows = pg * PAGE + r % PAGE
            ok = used & (rows < n)
            off = rows[:, None] * D + cols[None, :]
            k = tl.load(kp + off, mask=ok[:, None], other=0.0)
            s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PREC) * scale  # [GP, rows]
            take = ok[None, :] & (((hb[None, :] >> g[:, None]) & 1) != 0)
            s = tl.where(take, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.where(m_new > float("-inf"), tl.exp(m_i - m_new), 1.0)
            p = tl.where(take, tl.exp(s - m_new[:, None]), 0.0)
            v = tl.load(vp + off, mask=ok[:, None], other=0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
            it += BP
        out = (bk * n_ranges + rg) * GP + g
        tl.store(Part + out[:, None] * D + cols[None, :], acc)
        tl.store(Mx + out, m_i)
        tl.store(Sm + out, l_i)
        if MERGE:
            tl.debug_barrier()
            done = tl.atomic_add(Count + bk, 1, sem="acq_rel")
            if done == n_ranges - 1:
                sp = tl.arange(0, NS)
                used = sp < n_ranges
                for h in tl.static_range(G):
                    idx = (bk * n_ranges + sp) * GP + h
                    mx = tl.load(Mx + idx, mask=used, other=float("-inf"), cache_modifier=".cg")
                    top = tl.max(mx, 0)
                    w = tl.where(mx > float("-inf"), tl.exp(mx - top), 0.0)
                    tot = tl.sum(w * tl.load(Sm + idx, mask=used, other=0.0, cache_modifier=".cg"), 0)
                    part = tl.load(Part + idx[:, None] * D + cols[None, :], mask=used[:, None], other=0.0,
                                   cache_modifier=".cg")
                    tl.store(Out + (bk * G + h) * D + cols, (tl.sum(w[:, None] * part, 0) / tot).to(Out.dtype.element_ty))
                tl.atomic_xchg(Count + bk, 0, sem="relaxed")


def paged_union_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages_map: torch.Tensor, n: torch.Tensor,
                       page: int, scale: float, range_pages: int | None = None, block_pages: int | None = None,
                       num_warps: int = 4, counter: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, 1, D]; k, v [B, Hkv, C, D]; ``pages_map`` int8 [B, Hq, P] (1: the head attends the page; from
    ``quest_select.quest_select_triton(..., map_out=)``); n [1] -> [B, Hq, 1, D]. The same attention as
    ``paged_attention_torch`` over each head's listed pages, reading each page of the group's union once.
    ``range_pages``: pages per program (a power of two; default: about 512 programs). ``counter``: int32 zeros, >=
    B * Hkv entries, owned by the caller (left at zero): the ranges merge inside the kernel (no second launch)."""
    from scbench.kernels.combine import _combine_kernel

    b, hq, _, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    p = pages_map.shape[2]
    g = hq // hkv
    if g > 31 or pages_map.shape[:2] != (b, hq) or pages_map.dtype != torch.int8:
        raise ValueError(f"paged_union_triton: pages_map must be int8 [{b}, {hq}, P] with <= 31 heads per group, "
                         f"got {pages_map.dtype} {tuple(pages_map.shape)}")
    gp = max(16, triton.next_power_of_2(g))
    bp = block_pages or max(1, 64 // page)
    bp = max(bp, -(-16 // page))  # the matmuls need 16 rows per block
    rp = range_pages or max(bp, triton.next_power_of_2(-(-p * b * hkv // 512)))
    n_ranges = triton.cdiv(p, rp)
    part = torch.empty(b * hkv * n_ranges * gp, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b * hkv * n_ranges * gp, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    scratch = torch.empty(b * hkv * n_ranges * 2 * rp, dtype=torch.int32, device=q.device)
    out = torch.empty(b * hq, d, dtype=q.dtype, device=q.device)
    merge, ns = counter is not None, max(2, triton.next_power_of_2(n_ranges))
    if merge and (counter.dtype != torch.int32 or counter.numel() < b * hkv):
        raise ValueError(f"paged_union_triton: counter must be int32 zeros with >= {b * hkv} entries")
    _paged_union_kernel[(b * hkv, n_ranges)](
        q.reshape(b * hq, d).contiguous(), k, v, pages_map.contiguous(), n, part, mx, sm, scratch, out,
        counter if merge else mx, scale, c, p, n_ranges, G=g, GP=gp, D=d, PAGE=page, R=rp, BP=bp,
        PREC="ieee" if k.dtype == torch.float32 else "tf32", MERGE=merge, NS=ns, num_warps=num_warps)
    if not merge:
        _combine_kernel[(b * hkv, g)](part, mx, sm, out, n_ranges, G=g, GP=gp, D=d, NS=ns)
    return out.view(b, hq, 1, d)
