"""The KIVI kernel before v3 (scbench/kernels/kivi_decode.py at 5bdc435, verbatim; values in ``quantize``'s
layout, unpacked tile converted to the operand layout through shared memory), kept for scripts/bench_kivi_kernel.py.

Decode attention directly over KIVI's packed cache: 2/4-bit keys (per-channel groups) and values (per-token
groups) plus the full-precision residual, without de-quantising the cache into a new tensor.

Layout (one layer, ``scbench.kv.quant``'s formats in static buffers): packed keys/values uint8 [B, H, Cq, D*bits/8]
(element ``i * per + j`` of a row in bits ``j * bits`` of byte ``i``), key scale/zero [B, H, Cq / G, D], value
scale/zero [B, H, Cq, D / Gv], full-precision keys/values [B, H, R, D] of which rows [rs, re) are the residual;
``nq`` (quantized rows in use, a multiple of G), ``rs`` and ``re`` are device tensors, so a captured graph sees their
current values.
``kivi_attention_torch`` is the reference (de-quantise, masked softmax; also the CPU path). The Triton kernel splits
the quantized rows over programs (one more program for the residual, merged by log-sum-exp as flash-decoding does);
a program reads blocks of packed words once for all GQA heads of its KV head, unpacks them in registers, folds the
key scales into the queries and the value scales into the probabilities, and prefetches the next block
(``_kivi_kernel``). ``kivi_decode_step`` is one layer of the captured decode step: attention, then the residual
flush of ``scbench.kernels.kivi_flush``.
"""
from __future__ import annotations

import os

import torch

from scbench.kernels.kivi_flush import flush_kernel_ok, kivi_flush_torch, kivi_flush_triton  # noqa: F401 (API)
from scbench.kv.quant import dequantize

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
else:
    from scbench.kernels.combine import merge_splits
    from scbench.kernels.kivi_flush import _flush_group


def kivi_attention_torch(q, kp, ks, kz, vp, vs, vz, rk, rv, nq, rs, re, *, bits: int, group: int, vgroup: int,
                         scale: float, re_add: int = 0) -> torch.Tensor:
    """q [B, Hq, 1, D] -> [B, Hq, 1, D]: attention over the first ``nq`` quantized rows and residual rows
    [rs, re + re_add)."""
    re = re + re_add
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
    def _words(P, rows, valid, BITS: tl.constexpr, D: tl.constexpr, U: tl.constexpr):
        """Packed rows (P: their bytes, D * BITS / 8 a row) as int16 (U = 0) or int32 words [BT, words]."""
        if U == 0:
            NW: tl.constexpr = D * BITS // 16
            w = tl.load(P.to(tl.pointer_type(tl.int16)) + rows[:, None] * NW + tl.arange(0, NW)[None, :],
                        mask=valid[:, None], other=0)
        else:
            NW2: tl.constexpr = D * BITS // 32
            w = tl.load(P.to(tl.pointer_type(tl.int32)) + rows[:, None] * NW2 + tl.arange(0, NW2)[None, :],
                        mask=valid[:, None], other=0)
        return w

    @triton.jit
    def _decode(w, BT: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, MAGIC: tl.constexpr, DT: tl.constexpr,
                U: tl.constexpr):
        """``_words`` -> [BT, D] in DT: the integers x, or with MAGIC the bits of ``MAGIC + x`` (an exact float of
        the storage type: no int-to-float conversion). U = 0: int16 words, one element per shift, channels in
        order. U = 2 / 3 (MAGIC only): int32 words, one shift and one and-or per two elements (element j of each
        half-word), split into the 16-bit halves by shifts (U = 2, OFF + x; what the interpreter runs) or, in
        PTX, by one packed fma taking MAGIC off (exact integers, OFF = 0) and a register move (U = 3). Position
        c then holds channel ``_channel(c)``. (Keeping the pair in one register through a pack=2 asm on
        ``join(x, x)`` measured wrong on the GPU: pack=2 pairs other elements.)"""
        if U == 0:
            PER: tl.constexpr = 16 // BITS
            sh = (tl.arange(0, PER) * BITS).to(tl.int16)
            x = (w[:, :, None] >> sh[None, None, :]) & ((1 << BITS) - 1)
            if MAGIC != 0:
                x = (x | MAGIC).to(tl.int16).to(DT, bitcast=True)
            else:
                x = x.to(DT)
        else:
            HALF: tl.constexpr = 16 // BITS
            LV: tl.constexpr = (1 << BITS) - 1
            sh = tl.arange(0, HALF) * BITS
            x = ((w[:, :, None] >> sh[None, None, :]) & (LV | (LV << 16))) | (MAGIC | (MAGIC << 16))
            if U == 2:
                x = tl.join(x.to(tl.int16).to(DT, bitcast=True), (x >> 16).to(tl.int16).to(DT, bitcast=True))
            else:  # U == 3
                if MAGIC == 0x4300:
                    fma: tl.constexpr = ("{.reg .b32 o, m, t; mov.b32 o, 0x3F803F80; mov.b32 m, 0xC300C300; "
                                         "fma.rn.bf16x2 t, $2, o, m; mov.b32 {$0, $1}, t;}")
                else:
                    fma: tl.constexpr = ("{.reg .b32 o, m, t; mov.b32 o, 0x3C003C00; mov.b32 m, 0xE400E400; "
                                         "fma.rn.f16x2 t, $2, o, m; mov.b32 {$0, $1}, t;}")
                lo, hi = tl.inline_asm_elementwise(fma, "=h,=h,r", [x], dtype=(tl.int16, tl.int16), is_pure=True,
                                                   pack=1)
                x = tl.join(lo.to(DT, bitcast=True), hi.to(DT, bitcast=True))
        return tl.reshape(x, [BT, D])

    @triton.jit
    def _block(KW, VW, KS1, KZ1, VS1, VZ1, off, end, cols, BT: tl.constexpr, NB: tl.constexpr, NVP: tl.constexpr,
               NVG: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, U: tl.constexpr):
        """Everything block ``off`` reads (masked past ``end``): key/value words, key scale/zero [NB, D], value
        scale/zero [NVP, BT] (transposed)."""
        rows = tl.multiple_of(off, GROUP) + tl.arange(0, BT)
        valid = rows < end
        grp = off // GROUP + tl.arange(0, NB)
        gok = grp[:, None] * GROUP < end
        ks = tl.load(KS1 + grp[:, None] * D + cols[None, :], mask=gok, other=0.0)
        kz = tl.load(KZ1 + grp[:, None] * D + cols[None, :], mask=gok, other=0.0)
        vj = tl.arange(0, NVP)
        vok = (vj[:, None] < NVG) & valid[None, :]
        vs = tl.load(VS1 + rows[None, :] * NVG + vj[:, None], mask=vok, other=0.0)
        vz = tl.load(VZ1 + rows[None, :] * NVG + vj[:, None], mask=vok, other=0.0)
        return _words(KW, rows, valid, BITS, D, U), _words(VW, rows, valid, BITS, D, U), ks, kz, vs, vz

    @triton.jit
    def _channel(c, BITS: tl.constexpr, U: tl.constexpr):
        """The channel at position c of ``_decode``'s rows."""
        if U == 0:
            return c
        else:
            E: tl.constexpr = 32 // BITS
            return (c // E) * E + (c % 2) * (E // 2) + (c % E) // 2

    @triton.jit
    def _kivi_kernel(Q, KP, KS, KZ, VP, VS, VZ, RK, RV, NQ, RS, RE, Part, Mx, Sm, scale, CQ, R, n_splits, split,
                     re_add, full_len, FLUSH: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                     GROUP: tl.constexpr, VGROUP: tl.constexpr, NB: tl.constexpr, NVP: tl.constexpr,
                     MAGIC: tl.constexpr, OFF: tl.constexpr, RB: tl.constexpr, PREC: tl.constexpr,
                     U: tl.constexpr, PF: tl.constexpr):
        """Program (batch x KV head, split): splits < n_splits - 1 take quantized rows, the last the residual.

        A block holds NB key groups (BT = NB * GROUP tokens), read once for all GP query heads of the KV head.
        Keys: the per-channel scale of group i is folded into the queries, so one dot of the NB * GP rows
        (group i, head g) against the block's integers gives every score; row (i, g) is kept for the tokens of
        group i, plus the zero-point term q . zero_i. Values: the per-token scale of channel group j is folded
        into the probabilities, one dot of the NVP * GP rows (j, g) against the integers, row (j, g) kept for the
        channels of group j, plus p . zero_j. With MAGIC the integers enter as MAGIC-biased floats (OFF + x) and
        the OFF * sum(row) terms are taken off with the very rounded operands, so the results are exact sums of
        the rounded products. Scores are in log2 units (exp2); maxima are stored in natural-log units.
        With FLUSH the last split then quantizes the residual's oldest group when it holds ``full_len`` rows
        (``_kivi_flush_kernel``'s work: rows no split of this step reads); ``_kivi_combine_kernel`` moves the
        counters."""
        bh, sp = tl.program_id(0), tl.program_id(1)
        NVG: tl.constexpr = D // VGROUP
        BT: tl.constexpr = NB * GROUP
        DT: tl.constexpr = Q.dtype.element_ty
        LOG2E: tl.constexpr = 1.4426950408889634
        rows_q = tl.arange(0, GP)
        cols = _channel(tl.arange(0, D), BITS, U)  # every column below is in _decode's order
        q = tl.load(Q + bh * G * D + rows_q[:, None] * D + cols[None, :], mask=rows_q[:, None] < G, other=0.0)
        qs = q.to(tl.float32) * (scale * LOG2E)
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        nq = tl.load(NQ).to(tl.int32)
        rs = tl.load(RS).to(tl.int32)
        re = tl.load(RE).to(tl.int32) + re_add
        last = sp == n_splits - 1
        start = tl.where(last, 0, sp * split)
        end = tl.where(last, 0, tl.minimum(sp * split + split, nq))
        bh64 = bh.to(tl.int64)
        KW = KP + bh64 * CQ * (D * BITS // 8)
        VW = VP + bh64 * CQ * (D * BITS // 8)
        KS1, KZ1 = KS + bh64 * (CQ // GROUP) * D, KZ + bh64 * (CQ // GROUP) * D
        VS1, VZ1 = VS + bh64 * CQ * NVG, VZ + bh64 * CQ * NVG
        tb, gi, vj = tl.arange(0, BT), tl.arange(0, NB), tl.arange(0, NVP)
        ksel = gi[:, None, None] == (tb // GROUP)[None, None, :]
        vsel = vj[:, None, None] == (cols // VGROUP)[None, None, :]
        if PF:  # prefetch: block i + 1's loads are issued before block i's math
            kw, vw, ks, kz, vs, vz = _block(KW, VW, KS1, KZ1, VS1, VZ1, start, end, cols, BT, NB, NVP, NVG, GROUP,
                                            BITS, D, U)
        for off in range(start, end, BT):
            if PF:
                nxt = _block(KW, VW, KS1, KZ1, VS1, VZ1, off + BT, end, cols, BT, NB, NVP, NVG, GROUP, BITS, D, U)
            else:
                kw, vw, ks, kz, vs, vz = _block(KW, VW, KS1, KZ1, VS1, VZ1, off, end, cols, BT, NB, NVP, NVG, GROUP,
                                                BITS, D, U)
            valid = off + tb < end
            # scores: queries x key scales of the NB groups, against the integers
            qk = (qs[None, :, :] * ks.to(tl.float32)[:, None, :]).to(DT)
            bias = tl.sum(qs[None, :, :] * kz.to(tl.float32)[:, None, :], 2)
            if OFF != 0:
                bias -= OFF * tl.sum(qk.to(tl.float32), 2)
            kx = _decode(kw, BT, BITS, D, MAGIC, DT, U)
            s = tl.dot(tl.reshape(qk, [NB * GP, D]), tl.trans(kx), input_precision=PREC)
            s = tl.reshape(s, [NB, GP, BT]) + bias[:, :, None]
            s = tl.sum(tl.where(ksel, s, 0.0), 0)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            # values: probabilities x value scales of the channel groups, against the integers
            pv = (p[None, :, :] * vs.to(tl.float32)[:, None, :]).to(DT)
            vbias = tl.sum(p[None, :, :] * vz.to(tl.float32)[:, None, :], 2)
            if OFF != 0:
                vbias -= OFF * tl.sum(pv.to(tl.float32), 2)
            vx = _decode(vw, BT, BITS, D, MAGIC, DT, U)
            o = tl.dot(tl.reshape(pv, [NVP * GP, BT]), vx, input_precision=PREC)
            o = tl.reshape(o, [NVP, GP, D]) + vbias[:, :, None]
            acc = acc * alpha[:, None] + tl.sum(tl.where(vsel, o, 0.0), 0)
            m = m_new
            if PF:
                kw, vw, ks, kz, vs, vz = nxt
        rend = tl.where(last, re, rs)
        rb = tl.arange(0, RB)
        for off in range(rs, rend, RB):  # the residual rows, full precision (a few dozen: no tensor cores)
            rows = off + rb
            inside = rows < rend
            roff = bh64 * R * D + rows[:, None].to(tl.int64) * D + cols[None, :]
            k = tl.load(RK + roff, mask=inside[:, None], other=0.0).to(tl.float32)
            s = tl.sum(qs[:, None, :] * k[None, :, :], 2)
            s = tl.where(inside[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(RV + roff, mask=inside[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
            m = m_new
        out = (bh * n_splits + sp) * GP + rows_q
        tl.store(Part + out[:, None] * D + cols[None, :], acc)
        tl.store(Mx + out, m * 0.6931471805599453)
        tl.store(Sm + out, total)
        if FLUSH:
            if last & (re - rs == full_len):
                _flush_group(RK, RV, KP, KS, KZ, VP, VS, VZ, bh64, nq, rs, R, CQ, D, BITS, GROUP, VGROUP, DT)

    @triton.jit
    def _kivi_combine_kernel(Part, Mx, Sm, Out, n_splits, NQ, RS, RE, re_add, full_len, G: tl.constexpr,
                             GP: tl.constexpr, D: tl.constexpr, NS: tl.constexpr, COUNT: tl.constexpr,
                             GROUP: tl.constexpr):
        """``scbench.kernels.combine._combine_kernel`` (merge the splits of one batch x KV head, query head g),
        and with COUNT program (0, 0) advances nq and rs by GROUP when the residual held ``full_len`` rows."""
        bh, g = tl.program_id(0), tl.program_id(1)
        merge_splits(Part, Mx, Sm, Out, n_splits, bh, g, G, GP, D, NS)
        if COUNT:
            if (bh == 0) & (g == 0):
                nq, rs, re = tl.load(NQ), tl.load(RS), tl.load(RE) + re_add
                full = re - rs == full_len
                tl.store(NQ, tl.where(full, nq + GROUP, nq))
                tl.store(RS, tl.where(full, rs + GROUP, rs))


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


# num_warps, num_stages, programs (all heads) aimed at, padded query rows, _decode's U (bf16/fp16 only), prefetch;
# the fastest correct tuning of scripts/bench_kivi_kernel.py on an H200 (results/perf/kivi_kernel_h200.md)
TUNE = {"num_warps": 4, "num_stages": 1, "ctas": 264, "gp": 4, "unpack": 3, "prefetch": 1}


def kivi_attention_triton(q, kp, ks, kz, vp, vs, vz, rk, rv, nq, rs, re, *, bits: int, group: int, vgroup: int,
                          scale: float, re_add: int = 0, flush_residual: int | None = None, **tune) -> torch.Tensor:
    """The Triton kernel; same contract as ``kivi_attention_torch`` (residual rows [rs, re + re_add)). Needs
    ``attention_kernel_ok``. With ``flush_residual`` it also does ``kivi_flush_triton(rk, rv, ...,
    residual=flush_residual)`` (after the attention, as the plain path). ``tune`` overrides ``TUNE``."""
    t = {**TUNE, **tune}
    b, hq, _, d = q.shape
    h, cq, r = rk.shape[1], kp.shape[2], rk.shape[2]
    g = hq // h
    gp = max(t.get("gp", 4), _pow2(g))
    nb = max(1, 16 // gp)
    nvp = _pow2(max(d // vgroup, 16 // gp))
    bt = nb * group
    per_head = max(1, t["ctas"] // (b * h))
    split = max(bt, -(-cq // per_head // bt) * bt)
    n_splits = -(-cq // split) + 1
    q3 = q.reshape(b * h, g, d).contiguous()
    part = torch.empty(b * h * n_splits * gp, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b * h * n_splits * gp, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty(b * h, g, d, dtype=q.dtype, device=q.device)
    magic = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}.get(q.dtype, (0, 0.0))
    u = t.get("unpack", 0) if magic[0] else 0
    if u not in (0, 2, 3):
        raise ValueError(f"kivi_attention_triton: unpack must be 0, 2 or 3, got {u}")
    if u == 3 and os.environ.get("TRITON_INTERPRET") == "1":
        u = 2  # inline PTX cannot be interpreted: the same pairing, split by shifts
    off = 0.0 if u == 3 else magic[1]
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    flush = flush_residual is not None
    full_len = (flush_residual or 0) + group
    _kivi_kernel[(b * h, n_splits)](q3, kp, ks, kz, vp, vs, vz, rk, rv, nq, rs, re, part, mx, sm, scale, cq, r,
                                    n_splits, split, re_add, full_len, FLUSH=flush, G=g, GP=gp, D=d, BITS=bits,
                                    GROUP=group, VGROUP=vgroup, NB=nb, NVP=nvp, MAGIC=magic[0], OFF=off, RB=16,
                                    PREC=prec, U=u, PF=t["prefetch"], num_warps=t["num_warps"],
                                    num_stages=t["num_stages"])
    _kivi_combine_kernel[(b * h, g)](part, mx, sm, out, n_splits, nq, rs, re, re_add, full_len, G=g, GP=gp, D=d,
                                     NS=max(2, triton.next_power_of_2(n_splits)), COUNT=flush, GROUP=group)
    return out.view(b, hq, 1, d)


def attention_kernel_ok(bits: int, group: int, vgroup: int, head_dim: int) -> bool:
    """The Triton attention reads rows as int16 words (head_dim * bits a multiple of 16) and needs power-of-two
    head_dim, group >= 16 and vgroup <= head_dim."""
    pow2 = all(x >= 1 and x & (x - 1) == 0 for x in (group, vgroup, head_dim))
    return pow2 and head_dim * bits % 16 == 0 and vgroup <= head_dim and group >= 16


def _use_triton(q, bits, group, vgroup) -> bool:
    return q.is_cuda and triton is not None and attention_kernel_ok(bits, group, vgroup, q.shape[-1])


def kivi_attention(q, *bufs, bits: int, group: int, vgroup: int, scale: float, re_add: int = 0) -> torch.Tensor:
    """Triton on CUDA (``attention_kernel_ok``), the torch reference elsewhere."""
    if _use_triton(q, bits, group, vgroup):
        return kivi_attention_triton(q, *bufs, bits=bits, group=group, vgroup=vgroup, scale=scale, re_add=re_add)
    return kivi_attention_torch(q, *bufs, bits=bits, group=group, vgroup=vgroup, scale=scale, re_add=re_add)


FUSE_FLUSH = False
"""Whether ``kivi_decode_step`` on CUDA quantizes the full residual group inside the attention kernel (2 kernels a
layer) instead of the separate flush + counter kernels (4): tested in Triton's interpreter and by the CUDA tests,
not yet measured on a GPU, so off."""


def kivi_decode_step(q, kp, ks, kz, vp, vs, vz, k, v, nq, rs, at, *, bits: int, group: int, vgroup: int, scale: float,
                     residual: int, triton_ok: bool | None = None, fuse: bool | None = None) -> torch.Tensor:
    """One layer's decode step after the new key/value went to row ``at`` of k, v: attention over the quantized rows
    and the residual [rs, at], then (in place) the residual's oldest group quantized when it holds residual + group
    rows. CUDA: the Triton kernels (``fuse``, default ``FUSE_FLUSH``: the flush inside the attention kernel and the
    counters moved by the merge kernel); elsewhere (or ``triton_ok=False``) the torch reference ops."""
    bufs = (kp, ks, kz, vp, vs, vz)
    use = _use_triton(q, bits, group, vgroup) if triton_ok is None else triton_ok
    if use and (FUSE_FLUSH if fuse is None else fuse):
        return kivi_attention_triton(q, *bufs, k, v, nq, rs, at, bits=bits, group=group, vgroup=vgroup, scale=scale,
                                     re_add=1, flush_residual=residual)
    if use:
        out = kivi_attention_triton(q, *bufs, k, v, nq, rs, at, bits=bits, group=group, vgroup=vgroup, scale=scale,
                                    re_add=1)
        kivi_flush_triton(k, v, *bufs, nq, rs, at, bits=bits, group=group, vgroup=vgroup, residual=residual, re_add=1)
        return out
    re = at + 1
    out = kivi_attention_torch(q, *bufs, k, v, nq, rs, re, bits=bits, group=group, vgroup=vgroup, scale=scale)
    kivi_flush_torch(k, v, *bufs, nq, rs, re, bits=bits, group=group, vgroup=vgroup, residual=residual)
    return out
