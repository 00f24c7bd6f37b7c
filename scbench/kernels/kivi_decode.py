"""Decode attention directly over KIVI's packed cache: 2/4-bit keys (per-channel groups) and values (per-token
groups) plus the full-precision residual, without de-quantising the cache into a new tensor.

Layout (one layer, ``scbench.kv.quant``'s formats in static buffers): packed keys/values uint8 [B, H, Cq, D*bits/8]
(element ``i * per + j`` of a row in bits ``j * bits`` of byte ``i``), key scale/zero [B, H, Cq / G, D], value
scale/zero [B, H, Cq, D / Gv], full-precision keys/values [B, H, R, D] of which rows [rs, re) are the residual;
``nq`` (quantized rows in use, a multiple of G), ``rs`` and ``re`` are device tensors, so a captured graph sees their
current values.
``kivi_attention_torch`` is the reference (de-quantise, masked softmax; also the CPU path); the Triton kernel
de-quantises each block in registers (split over the quantized rows, one more program for the residual, merged as
flash-decoding does).
"""
from __future__ import annotations

import torch

from scbench.kv.quant import dequantize

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def kivi_attention_torch(q, kp, ks, kz, vp, vs, vz, rk, rv, nq, rs, re, *, bits: int, group: int, vgroup: int,
                         scale: float) -> torch.Tensor:
    """q [B, Hq, 1, D] -> [B, Hq, 1, D]: attention over the first ``nq`` quantized rows and residual rows [rs, re)."""
    b, hq, _, d = q.shape
    h = rk.shape[1]
    keys = torch.cat([dequantize(kp, ks, kz, bits, group, -2, rk.dtype), rk], dim=-2)
    vals = torch.cat([dequantize(vp, vs, vz, bits, vgroup, -1, rv.dtype), rv], dim=-2)
    cq, r = kp.shape[2], rk.shape[2]
    rr = torch.arange(r, device=q.device)
    ok = torch.cat([torch.arange(cq, device=q.device) < nq, (rr >= rs) & (rr < re)])
    qs = q.reshape(b, h, hq // h, d).float()
    s = (qs @ keys.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~ok, float("-inf"))
    return (s.softmax(-1) @ vals.float()).to(q.dtype).view(b, hq, 1, d)


if triton is not None:

    @triton.jit
    def _kivi_kernel(Q, KP, KS, KZ, VP, VS, VZ, RK, RV, NQ, RS, RE, Part, Mx, Sm, scale, CQ, R, n_splits, split,
                     G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                     VGROUP: tl.constexpr, PREC: tl.constexpr):
        """Program (batch x KV head, split): splits < n_splits - 1 take quantized rows, the last the residual."""
        bh, sp = tl.program_id(0), tl.program_id(1)
        PER: tl.constexpr = 8 // BITS
        DB: tl.constexpr = D // PER
        LEVELS: tl.constexpr = (1 << BITS) - 1
        rows_q, cols = tl.arange(0, GP), tl.arange(0, D)
        q = tl.load(Q + bh * G * D + rows_q[:, None] * D + cols[None, :], mask=rows_q[:, None] < G, other=0.0)
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        nq = tl.load(NQ).to(tl.int32)
        rs = tl.load(RS).to(tl.int32)
        re = tl.load(RE).to(tl.int32)
        last = sp == n_splits - 1
        start = tl.where(last, 0, sp * split)
        end = tl.where(last, 0, tl.minimum(sp * split + split, nq))
        bh64 = bh.to(tl.int64)
        shift = ((cols % PER) * BITS).to(tl.uint8)
        for off in range(start, end, GROUP):  # one key group (GROUP rows) per iteration
            rows = off + tl.arange(0, GROUP)
            poff = bh64 * CQ * DB + rows[:, None].to(tl.int64) * DB + (cols // PER)[None, :]
            kq = (tl.load(KP + poff) >> shift[None, :]) & LEVELS
            kg = bh64 * (CQ // GROUP) * D + (off // GROUP) * D + cols
            k = kq.to(tl.float32) * tl.load(KS + kg).to(tl.float32)[None, :] + tl.load(KZ + kg).to(tl.float32)[None, :]
            sc = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * scale
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            vq = (tl.load(VP + poff) >> shift[None, :]) & LEVELS
            vg = bh64 * CQ * (D // VGROUP) + rows[:, None].to(tl.int64) * (D // VGROUP) + (cols // VGROUP)[None, :]
            v = (vq.to(tl.float32) * tl.load(VS + vg).to(tl.float32) + tl.load(VZ + vg).to(tl.float32)).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PREC)
            m = m_new
        rend = tl.where(last, re, rs)
        for off in range(rs, rend, 16):  # the residual rows, full precision
            rows = off + tl.arange(0, 16)
            inside = rows < rend
            roff = bh64 * R * D + rows[:, None].to(tl.int64) * D + cols[None, :]
            k = tl.load(RK + roff, mask=inside[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            sc = tl.where(inside[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(RV + roff, mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m = m_new
        out = (bh * n_splits + sp) * GP + rows_q
        tl.store(Part + out[:, None] * D + cols[None, :], acc)
        tl.store(Mx + out, m)
        tl.store(Sm + out, total)


def kivi_attention_triton(q, kp, ks, kz, vp, vs, vz, rk, rv, nq, rs, re, *, bits: int, group: int, vgroup: int,
                          scale: float) -> torch.Tensor:
    """The Triton kernel (CUDA); same contract as ``kivi_attention_torch``. Needs group a power of two >= 16."""
    from scbench.engines.fastdecode import _combine_kernel

    b, hq, _, d = q.shape
    h, cq, r = rk.shape[1], kp.shape[2], rk.shape[2]
    g = hq // h
    split = max(256, -(-cq // 64 // group) * group)
    n_splits = -(-cq // split) + 1
    gp = max(16, triton.next_power_of_2(g))
    q3 = q.reshape(b * h, g, d).contiguous()
    part = torch.empty(b * h * n_splits * gp, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b * h * n_splits * gp, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty(b * h, g, d, dtype=q.dtype, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _kivi_kernel[(b * h, n_splits)](q3, kp, ks, kz, vp, vs, vz, rk, rv, nq, rs, re, part, mx, sm, scale, cq, r, n_splits,
                                    split, G=g, GP=gp, D=d, BITS=bits, GROUP=group, VGROUP=vgroup, PREC=prec)
    _combine_kernel[(b * h, g)](part, mx, sm, out, n_splits, G=g, GP=gp, D=d,
                                NS=max(2, triton.next_power_of_2(n_splits)))
    return out.view(b, hq, 1, d)


def kivi_attention(q, *bufs, bits: int, group: int, vgroup: int, scale: float) -> torch.Tensor:
    """Triton on CUDA (group a power of two >= 16), the torch reference elsewhere."""
    if q.is_cuda and triton is not None and group >= 16 and group & (group - 1) == 0:
        return kivi_attention_triton(q, *bufs, bits=bits, group=group, vgroup=vgroup, scale=scale)
    return kivi_attention_torch(q, *bufs, bits=bits, group=group, vgroup=vgroup, scale=scale)
