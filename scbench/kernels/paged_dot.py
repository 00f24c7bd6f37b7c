"""Paged decode attention with one list per query head, as matmuls (CUDA; CPU tensors in Triton's interpreter).

``paged_decode._paged_kernel`` scores a block of rows with elementwise products and reductions across the
threads; here the query is padded to 16 rows and each block is two small ``tl.dot``s (the tensor cores' operand
loads go through shared memory and the loop can be software-pipelined: ``num_stages`` blocks in flight), the
same contract as ``paged_decode.paged_attention_torch`` (its reference; tests/unit/test_topk_select.py). The splits
merge in ``combine._combine_kernel`` or, with ``counter``, inside the kernel (the head's last split).
"""
from __future__ import annotations

import torch

from scbench.kernels.paged_decode import pdl_args, triton

if triton is not None:
    import triton.language as tl

    from scbench.kernels.paged_decode import _pdl

    @triton.jit
    def _paged_dot_kernel(Q, K, V, Pages, N, Part, Mx, Sm, Out, Count, scale, C, M, per_split, n_splits,
                          HQ: tl.constexpr, HKV: tl.constexpr, HS: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                          BP: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr, MERGE: tl.constexpr,
                          NS: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = False):
        """(batch x query head, split of its page list); row 0 of the padded query is the head's query."""
        _pdl(PDL)
        bq, sp = tl.program_id(0), tl.program_id(1)
        b, h = bq // HQ, bq % HQ
        kvh = h // (HQ // HKV)
        sel = h // (HQ // HS)
        n = tl.load(N).to(tl.int32)
        cols, g = tl.arange(0, D), tl.arange(0, 16)
        q = tl.load(Q + bq * D + g[:, None] * 0 + cols[None, :], mask=g[:, None] == 0, other=0.0)
        r = tl.arange(0, BP * PAGE)
        base = (b * HKV + kvh).to(tl.int64) * C * D
        kp, vp = K + base, V + base
        plist = Pages + (b * HS + sel).to(tl.int64) * M
        start = sp * per_split
        end = tl.minimum(start + per_split, M)
        m_i = tl.full([16], float("-inf"), tl.float32)
        l_i = tl.zeros([16], tl.float32)
        acc = tl.zeros([16, D], tl.float32)
        for it in tl.range(ITERS, num_stages=STAGES):
            slot = start + it * BP + r // PAGE
            pg = tl.load(plist + slot, mask=slot < end, other=-1).to(tl.int32)
            rows = pg * PAGE + r % PAGE
            ok = (pg >= 0) & (rows < n)
            off = rows[:, None] * D + cols[None, :]
            k = tl.load(kp + off, mask=ok[:, None], other=0.0)
            v = tl.load(vp + off, mask=ok[:, None], other=0.0)
            s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PREC) * scale  # [16, rows]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.where(m_new > float("-inf"), tl.exp(m_i - m_new), 1.0)
            p = tl.where(ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        first = g == 0
        out = bq * n_splits + sp
        tl.store(Part + out * D + cols, tl.sum(tl.where(first[:, None], acc, 0.0), 0))
        tl.store(Mx + out, tl.max(tl.where(first, m_i, float("-inf")), 0))
        tl.store(Sm + out, tl.sum(tl.where(first, l_i, 0.0), 0))
        if MERGE:  # the head's last split to finish merges them; Count is left at 0
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


def paged_dot_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, n: torch.Tensor,
                     page: int, scale: float, pages_per_split: int = 16, block_pages: int | None = None,
                     num_warps: int = 4, num_stages: int = 3, counter: torch.Tensor | None = None,
                     pdl: bool = False) -> torch.Tensor:
    """q [B, Hq, 1, D]; k, v [B, Hkv, C, D]; pages [B, Hs, M] (-1: unused); n [1] -> [B, Hq, 1, D].
    ``counter``: int32 zeros, >= B * Hq entries, left at zero: the splits merge inside the kernel."""
    from scbench.kernels.combine import _combine_kernel

    b, hq, _, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    hs, m = pages.shape[1], pages.shape[2]
    bp = max(block_pages or max(1, 64 // page), -(-16 // page))  # the matmuls need 16 rows per block
    per = max(bp, -(-pages_per_split // bp) * bp)
    n_splits = max(1, -(-m // per))
    part = torch.empty(b * hq * n_splits, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b * hq * n_splits, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty(b * hq, d, dtype=q.dtype, device=q.device)
    merge, ns = counter is not None, max(2, triton.next_power_of_2(n_splits))
    if merge and (counter.dtype != torch.int32 or counter.numel() < b * hq):
        raise ValueError(f"paged_dot_triton: counter must be int32 zeros with >= {b * hq} entries")
    _paged_dot_kernel[(b * hq, n_splits)](
        q.reshape(b * hq, d).contiguous(), k, v, pages.contiguous(), n, part, mx, sm, out, counter if merge else mx,
        scale, c, m, per, n_splits, HQ=hq, HKV=hkv, HS=hs, D=d, PAGE=page, BP=bp, ITERS=per // bp, STAGES=num_stages,
        MERGE=merge, NS=ns, PREC="ieee" if k.dtype == torch.float32 else "tf32", num_warps=num_warps, **pdl_args(pdl))
    if not merge:
        _combine_kernel[(b * hq, 1)](part, mx, sm, out, n_splits, G=1, GP=1, D=d, NS=ns)
    return out.view(b, hq, 1, d)
