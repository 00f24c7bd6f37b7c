"""Decode attention directly over KIVI's packed cache: 2/4-bit keys (per-channel groups) and values (per-token
groups) plus the full-precision residual, without de-quantising the cache into a new tensor.

Layout (one layer, static buffers): packed keys uint8 [B, H, Cq, D*bits/8] in ``scbench.kv.quant``'s format (a
token row; element ``i * per + j`` in bits ``j * bits`` of byte ``i``), packed values in the same bytes but
*token-major* (``values_to_words``: per chunk of T = 32 / bits tokens, one int32 word per channel holding the T
tokens, token k in bits ``k * bits``), key scale/zero [B, H, Cq / G, D], value scale/zero [B, H, Cq, D / Gv],
full-precision keys/values [B, H, R, D] of which rows [rs, re) are the residual; ``nq`` (quantized rows in use, a
multiple of G), ``rs`` and ``re`` are device tensors, so a captured graph sees their current values.

``kivi_attention_torch`` is the reference (standard layout: de-quantise, masked softmax; also the CPU path). The
Triton kernel splits the quantized rows over programs (one more program for the residual, merged by log-sum-exp as
flash-decoding does); a program reads a block of int32 words once for all GQA heads of its KV head. Each word is
unpacked in registers by inline PTX (``scbench.kernels.kivi_unpack``: each field OR-ed into the mantissa of a
bf16/fp16 constant, the constant taken off by one packed fma, two fields per shift), the
two 16-bit halves of each 32-bit result being adjacent elements of the reduction dimension: channels for keys
(rows are tokens), tokens for values (hence their token-major layout), which is what the tensor-core operands pair,
so no unpacked tile moves through shared memory. Key scales are folded into the queries and value scales into the
probabilities (one tensor-core product per block for the 4 GQA heads, ``_kivi_kernel``). ``kivi_decode_step`` is
one layer of the captured decode step: attention, then the residual flush of ``scbench.kernels.kivi_flush``.
"""
from __future__ import annotations

import os

import torch

from scbench.kernels.kivi_flush import (flush_kernel_ok, kivi_flush_torch, kivi_flush_triton,  # noqa: F401 (API)
                                        values_from_words, values_to_words)
from scbench.kernels.kivi_unpack import MAGIC, unpack_asm  # noqa: F401 (API)
from scbench.kv.quant import dequantize

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
else:
    from scbench.kernels.combine import merge_splits
    from scbench.kernels.kivi_flush import _flush_group
    from scbench.kernels.kivi_unpack import _perm, _unpack


def kivi_attention_torch(q, kp, ks, kz, vp, vs, vz, rk, rv, nq, rs, re, *, bits: int, group: int, vgroup: int,
                         scale: float, re_add: int = 0) -> torch.Tensor:
    """q [B, Hq, 1, D] -> [B, Hq, 1, D]: attention over the first ``nq`` quantized rows and residual rows
    [rs, re + re_add). Standard layout (``scbench.kv.quant``) for keys and values."""
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
    def _words_at(KW, VW, off, end, tokp, BT: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                  D: tl.constexpr):
        """Block ``off``'s words (masked past ``end``), rows in position order (token ``tokp``): key words
        [BT, D / T], value words [D, BT / T] (token-major chunks)."""
        T: tl.constexpr = 32 // BITS
        NW: tl.constexpr = D // T
        rows = tl.multiple_of(off, GROUP) + tokp
        kw = tl.load(KW + rows[:, None] * NW + tl.arange(0, NW)[None, :], mask=(rows < end)[:, None], other=0)
        ch = off // T + tl.arange(0, BT // T)
        vw = tl.load(VW + ch[None, :] * D + tl.arange(0, D)[:, None], mask=(ch * T < end)[None, :], other=0)
        return kw, vw

    @triton.jit
    def _scales_at(KS1, KZ1, VS1, VZ1, off, end, cols, tokp, NB: tl.constexpr, NVP: tl.constexpr,
                   NVG: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr):
        """Block ``off``'s key scale/zero [NB, D] (channels in position order) and value scale/zero [NVP, BT]
        (transposed, tokens in position order)."""
        rows = tl.multiple_of(off, GROUP) + tokp
        grp = off // GROUP + tl.arange(0, NB)
        gok = grp[:, None] * GROUP < end
        ks = tl.load(KS1 + grp[:, None] * D + cols[None, :], mask=gok, other=0.0)
        kz = tl.load(KZ1 + grp[:, None] * D + cols[None, :], mask=gok, other=0.0)
        vj = tl.arange(0, NVP)
        vok = (vj[:, None] < NVG) & (rows < end)[None, :]
        vs = tl.load(VS1 + rows[None, :] * NVG + vj[:, None], mask=vok, other=0.0)
        vz = tl.load(VZ1 + rows[None, :] * NVG + vj[:, None], mask=vok, other=0.0)
        return ks, kz, vs, vz

    @triton.jit
    def _block(KW, VW, KS1, KZ1, VS1, VZ1, off, end, cols, tokp, BT: tl.constexpr, NB: tl.constexpr,
               NVP: tl.constexpr, NVG: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr):
        """Everything block ``off`` reads: ``_words_at`` then ``_scales_at``."""
        kw, vw = _words_at(KW, VW, off, end, tokp, BT, GROUP, BITS, D)
        ks, kz, vs, vz = _scales_at(KS1, KZ1, VS1, VZ1, off, end, cols, tokp, NB, NVP, NVG, GROUP, D)
        return kw, vw, ks, kz, vs, vz

    @triton.jit
    def _blocks(KW, VW, KS1, KZ1, VS1, VZ1, qs, start, end, cols, tokp, m, total, acc, BT: tl.constexpr,
                NB: tl.constexpr, GP: tl.constexpr, NVP: tl.constexpr, NVG: tl.constexpr, GROUP: tl.constexpr,
                VGROUP: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr, DT: tl.constexpr, MAGIC: tl.constexpr,
                ASM: tl.constexpr, PREC: tl.constexpr, PF: tl.constexpr):
        """The quantized blocks [start, end) of ``_kivi_kernel``, query rows x tokens: (m, total, acc [GP, D])."""
        T: tl.constexpr = 32 // BITS
        gi, vj = tl.arange(0, NB), tl.arange(0, NVP)
        ksel = gi[:, None, None] == (tokp // GROUP)[None, None, :]
        vsel = vj[:, None, None] == (tl.arange(0, D) // VGROUP)[None, None, :]
        if PF:  # prefetch: block i + 1's loads (PF 2: its words only) are issued before block i's math
            kw, vw, ks, kz, vs, vz = _block(KW, VW, KS1, KZ1, VS1, VZ1, start, end, cols, tokp, BT, NB, NVP, NVG,
                                            GROUP, BITS, D)
        for off in range(start, end, BT):
            if PF == 1:
                nxt = _block(KW, VW, KS1, KZ1, VS1, VZ1, off + BT, end, cols, tokp, BT, NB, NVP, NVG, GROUP, BITS, D)
            elif PF == 2:
                nkw, nvw = _words_at(KW, VW, off + BT, end, tokp, BT, GROUP, BITS, D)
                ks, kz, vs, vz = _scales_at(KS1, KZ1, VS1, VZ1, off, end, cols, tokp, NB, NVP, NVG, GROUP, D)
            else:
                kw, vw, ks, kz, vs, vz = _block(KW, VW, KS1, KZ1, VS1, VZ1, off, end, cols, tokp, BT, NB, NVP, NVG,
                                                GROUP, BITS, D)
            valid = off + tokp < end
            # scores: queries x key scales of the NB groups, against the integers
            qk = (qs[None, :, :] * ks.to(tl.float32)[:, None, :]).to(DT)
            bias = tl.sum(qs[None, :, :] * kz.to(tl.float32)[:, None, :], 2)
            kx = _unpack(kw, BT, D // T, BITS, DT, MAGIC, ASM)
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
            vx = tl.trans(_unpack(vw, D, BT // T, BITS, DT, MAGIC, ASM))
            o = tl.dot(tl.reshape(pv, [NVP * GP, BT]), vx, input_precision=PREC)
            o = tl.reshape(o, [NVP, GP, D]) + vbias[:, :, None]
            acc = acc * alpha[:, None] + tl.sum(tl.where(vsel, o, 0.0), 0)
            m = m_new
            if PF == 1:
                kw, vw, ks, kz, vs, vz = nxt
            elif PF == 2:
                kw, vw = nkw, nvw
        return m, total, acc

    @triton.jit
    def _kivi_kernel(Q, KP, KS, KZ, VP, VS, VZ, RK, RV, NQ, RS, RE, Part, Mx, Sm, Out, Cnt, scale, CQ, R, n_splits,
                     split, re_add, full_len, FLUSH: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                     BITS: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr, NB: tl.constexpr,
                     NVP: tl.constexpr, RB: tl.constexpr, PREC: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr,
                     PF: tl.constexpr, MERGE: tl.constexpr, NS: tl.constexpr, NRES: tl.constexpr):
        """Program (batch x KV head, split): splits < n_splits - NRES take quantized rows, the last NRES the residual
        (split j of them its RB-row blocks j, j + NRES, ...: a long residual, e.g. a request's prompt and its decoded
        tokens under ``decode_cache=temp``, is read by NRES programs instead of one).

        A block holds NB key groups (BT = NB * GROUP tokens), read once for all GP query heads of the KV head, in
        position order: key channels and block tokens are permuted within each word's T elements (``_perm``) as
        ``_unpack`` leaves them; the queries are loaded in that channel order, the value scales and the validity in
        that token order, so the products need no reordering. Keys: the per-channel scale of group i is folded into
        the queries, so one dot of the NB * GP rows (group i, head g) against the block's integers gives every
        score; row (i, g) is kept for the tokens of group i, plus the zero-point term q . zero_i. Values: the
        per-token scale of channel group j is folded into the probabilities, one dot of the NVP * GP rows (j, g)
        against the integers, row (j, g) kept for the channels of group j, plus p . zero_j. Scores are in log2 units
        (exp2); maxima are stored in natural-log units. With FLUSH the last split then quantizes the residual's
        oldest group when it holds ``full_len`` rows (rows no split of this step reads); ``_kivi_combine_kernel``
        moves the counters."""
        bh, sp = tl.program_id(0), tl.program_id(1)
        T: tl.constexpr = 32 // BITS
        NVG: tl.constexpr = D // VGROUP
        BT: tl.constexpr = NB * GROUP
        DT: tl.constexpr = Q.dtype.element_ty
        LOG2E: tl.constexpr = 1.4426950408889634
        rows_q = tl.arange(0, GP)
        cols = _perm(tl.arange(0, D), T)  # key channel at each position
        vcols = tl.arange(0, D)  # values (and the output): channels in order
        q = tl.load(Q + bh * G * D + rows_q[:, None] * D + cols[None, :], mask=rows_q[:, None] < G, other=0.0)
        qs = q.to(tl.float32) * (scale * LOG2E)
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        nq = tl.load(NQ).to(tl.int32)
        rs = tl.load(RS).to(tl.int32)
        re = tl.load(RE).to(tl.int32) + re_add
        last = sp >= n_splits - NRES
        rsplit = sp - (n_splits - NRES)  # which residual split (when last)
        start = tl.where(last, 0, sp * split)
        end = tl.where(last, 0, tl.minimum(sp * split + split, nq))
        bh64 = bh.to(tl.int64)
        KW = tl.multiple_of(KP.to(tl.pointer_type(tl.int32)) + bh64 * CQ * (D * BITS // 32), 16)
        VW = tl.multiple_of(VP.to(tl.pointer_type(tl.int32)) + bh64 * CQ * (D * BITS // 32), 16)
        KS1, KZ1 = KS + bh64 * (CQ // GROUP) * D, KZ + bh64 * (CQ // GROUP) * D
        VS1, VZ1 = VS + bh64 * CQ * NVG, VZ + bh64 * CQ * NVG
        tokp = _perm(tl.arange(0, BT), T)  # block token at each position
        m, total, acc = _blocks(KW, VW, KS1, KZ1, VS1, VZ1, qs, start, end, cols, tokp, m, total, acc, BT, NB, GP, NVP,
                                NVG, GROUP, VGROUP, BITS, D, DT, MAGIC, ASM, PREC, PF)
        rend = tl.where(last, re, rs)
        rb = tl.arange(0, RB)
        rstart = rs + tl.where(last, rsplit, 0) * RB
        for off in range(rstart, rend, NRES * RB):  # residual rows, full precision (a few dozen: no tensor cores)
            rows = off + rb
            inside = rows < rend
            rbase = bh64 * R * D + rows[:, None].to(tl.int64) * D
            k = tl.load(RK + rbase + cols[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
            s = tl.sum(qs[:, None, :] * k[None, :, :], 2)
            s = tl.where(inside[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(RV + rbase + vcols[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
            m = m_new
        out = (bh * n_splits + sp) * GP + rows_q
        tl.store(Part + out[:, None] * D + vcols[None, :], acc)
        tl.store(Mx + out, m * 0.6931471805599453)
        tl.store(Sm + out, total)
        if FLUSH:
            if last & (rsplit == 0) & (re - rs == full_len):
                _flush_group(RK, RV, KP, KS, KZ, VP, VS, VZ, bh64, nq, rs, R, CQ, D, BITS, GROUP, VGROUP, DT)
        if MERGE:  # the last program of a (batch x KV head) merges its splits; the last of all moves the counters
            tl.debug_barrier()  # every thread's partial stores before the release below
            nbh = tl.num_programs(0)
            if tl.atomic_add(Cnt + bh, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
                _merge_heads(Part, Mx, Sm, Out, n_splits, bh, G, GP, D, NS)
                tl.store(Cnt + bh, 0)  # ready for the next launch (layers and graph replays reuse the counters)
            if FLUSH:
                if tl.atomic_add(Cnt + nbh, 1, sem="acq_rel", scope="gpu") == nbh * n_splits - 1:
                    full = re - rs == full_len  # every program has read nq / rs: move them
                    tl.store(NQ, tl.where(full, nq + GROUP, nq).to(NQ.dtype.element_ty))
                    tl.store(RS, tl.where(full, rs + GROUP, rs).to(RS.dtype.element_ty))
                    tl.store(Cnt + nbh, 0)

    @triton.jit
    def _merge_heads(Part, Mx, Sm, Out, n_splits, bh, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                     NS: tl.constexpr):
        """``merge_splits`` for all query heads of one (batch x KV head) at once, 16 splits a pass (one program merges
        while the others have finished: wide loads instead of G serial merges)."""
        sp, hq, cols = tl.arange(0, NS), tl.arange(0, GP), tl.arange(0, D)
        idx = (bh * n_splits + sp)[:, None] * GP + hq[None, :]
        m = tl.load(Mx + idx, mask=(sp < n_splits)[:, None], other=float("-inf"))
        top = tl.max(m, 0)  # [GP]
        w = tl.where(m > float("-inf"), tl.exp(m - top[None, :]), 0.0)
        total = tl.sum(w * tl.load(Sm + idx, mask=(sp < n_splits)[:, None], other=0.0), 0)
        acc = tl.zeros([GP, D], tl.float32)
        c16 = tl.arange(0, 16)
        for c in range(0, n_splits, 16):
            used = (c + c16) < n_splits
            i16 = (bh * n_splits + c + c16)[:, None] * GP + hq[None, :]  # [16, GP]
            mc = tl.load(Mx + i16, mask=used[:, None], other=float("-inf"))
            wc = tl.where(mc > float("-inf"), tl.exp(mc - top[None, :]), 0.0)
            part = tl.load(Part + i16[:, :, None] * D + cols[None, None, :], mask=used[:, None, None], other=0.0)
            acc += tl.sum(wc[:, :, None] * part, 0)
        res = acc / total[:, None]
        tl.store(Out + (bh * G + hq)[:, None] * D + cols[None, :], res.to(Out.dtype.element_ty), mask=hq[:, None] < G)

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


# num_warps, num_stages, programs (all heads) aimed at, padded query rows, inline-PTX unpack mode (bf16/fp16; 0: none),
# prefetch of the next block into registers (1: all of it, 2: its words only), register cap (maxnreg, 0: none; 128 lets 4 programs share an SM, no
# spills without prefetch): scripts/bench_kivi_kernel.py measures them on a GPU (results/perf/kivi_kernel_h200.md)
TUNE = {"num_warps": 4, "num_stages": 1, "ctas": 528, "gp": 4, "asm": 3, "prefetch": 0, "maxnreg": 128}


def res_splits(rows: int) -> int:
    """Programs per (batch x KV head) that read the residual, from its buffer's rows: one up to 128 rows (the
    quantized decode's residual: ``residual`` to ``residual + group`` tokens), else one per 64 rows, at most 8 (a
    temp decode's residual holds a request's prompt and every decoded token; one program over a few hundred rows
    was the step's critical path at 32K)."""
    return 1 if rows <= 128 else min(8, -(-rows // 64))


def kivi_attention_triton(q, kp, ks, kz, vp, vs, vz, rk, rv, nq, rs, re, *, bits: int, group: int, vgroup: int,
                          scale: float, re_add: int = 0, flush_residual: int | None = None, **tune) -> torch.Tensor:
    """The Triton kernel; the contract of ``kivi_attention_torch`` (residual rows [rs, re + re_add)) except that
    the packed values ``vp`` are token-major (``values_to_words``). Needs ``attention_kernel_ok``. With
    ``flush_residual`` it also does ``kivi_flush_triton(rk, rv, ..., residual=flush_residual)`` (after the
    attention, as the plain path). ``tune`` overrides ``TUNE``."""
    t = {**TUNE, **tune}
    b, hq, _, d = q.shape
    h, cq, r = rk.shape[1], kp.shape[2], rk.shape[2]
    g = hq // h
    gp = max(t.get("gp", 4), _pow2(g))
    nb = t.get("nb") or max(1, 16 // gp)  # key groups per block
    nvp = _pow2(max(d // vgroup, 16 // gp))
    bt = nb * group
    per_head = max(1, t["ctas"] // (b * h))
    split = max(bt, -(-cq // per_head // bt) * bt)
    n_res = t.get("res_splits") or res_splits(r)
    n_splits = -(-cq // split) + n_res
    q3 = q.reshape(b * h, g, d).contiguous()
    part = torch.empty(b * h * n_splits * gp, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b * h * n_splits * gp, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty(b * h, g, d, dtype=q.dtype, device=q.device)
    use_asm = t["asm"] and q.dtype in MAGIC and os.environ.get("TRITON_INTERPRET") != "1"
    asm = unpack_asm(q.dtype, bits, t["asm"]) if use_asm else ""  # inline PTX cannot be interpreted
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    flush = flush_residual is not None
    full_len = (flush_residual or 0) + group
    merge = bool(t.get("one")) and flush  # one kernel a layer: merge and counters by the last programs
    cnt = counters(q.device, b * h + 1) if merge else part
    ns = max(2, triton.next_power_of_2(n_splits))
    _kivi_kernel[(b * h, n_splits)](q3, kp, ks, kz, vp, vs, vz, rk, rv, nq, rs, re, part, mx, sm, out, cnt, scale, cq,
                                    r, n_splits, split, re_add, full_len, FLUSH=flush, G=g, GP=gp, D=d, BITS=bits,
                                    GROUP=group, VGROUP=vgroup, NB=nb, NVP=nvp, RB=16, PREC=prec,
                                    MAGIC=MAGIC[q.dtype][0] if asm else 0, ASM=asm, PF=t["prefetch"],
                                    MERGE=merge, NS=ns, NRES=n_res, num_warps=t["num_warps"],
                                    num_stages=t["num_stages"],
                                    **({"maxnreg": t["maxnreg"]} if t.get("maxnreg") else {}))
    if not merge:
        _kivi_combine_kernel[(b * h, g)](part, mx, sm, out, n_splits, nq, rs, re, re_add, full_len, G=g, GP=gp, D=d,
                                         NS=ns, COUNT=flush, GROUP=group)
    return out.view(b, hq, 1, d)


_COUNTERS: dict = {}


def counters(device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for the single-kernel step (each launch leaves them at zero again), one set
    per device and size. Callers that capture CUDA graphs make them first, outside the capture (the plugin's
    ``allocate``), so that they do not live in a graph's private memory pool."""
    key = (str(device), n)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def attention_kernel_ok(bits: int, group: int, vgroup: int, head_dim: int) -> bool:
    """The Triton attention reads rows as int32 words (head_dim * bits a multiple of 32) and needs power-of-two
    head_dim, group >= 16 and vgroup <= head_dim (group then holds whole token-major value words)."""
    pow2 = all(x >= 1 and x & (x - 1) == 0 for x in (group, vgroup, head_dim))
    return pow2 and head_dim * bits % 32 == 0 and vgroup <= head_dim and group >= 16 and bits in (2, 4)


def _use_triton(q, bits, group, vgroup) -> bool:
    return q.is_cuda and triton is not None and attention_kernel_ok(bits, group, vgroup, q.shape[-1])


FUSE_FLUSH = int(os.environ.get("SCBENCH_KIVI_FLUSH", "0"))
"""(``SCBENCH_KIVI_FLUSH`` sets it for a run.) How ``kivi_decode_step`` on CUDA runs a layer: 0: attention + merge, then
the flush + counter kernels (4 kernels); 1: the flush inside the attention kernel, the counters moved by the merge
kernel (2); 2: one kernel, the last program of each KV head merging its splits and the last of all moving the counters
(arrival counters). All three match the torch step on an H200 (tests/methods/test_kivi_fast.py). Default 0: in the
captured 8B decode step on an H200 (scripts/profile_kivi_step.py, results/perf/kivi_e2e_h200.md) mode 0's graph step
is 8.03 ms at 131K and 5.76 ms at 32K against 8.19 / 5.99 ms for mode 2 (its merge tail, one program per KV head
after all splits, costs more than the three launches it saves)."""


def kivi_decode_step(q, kp, ks, kz, vp, vs, vz, k, v, nq, rs, at, *, bits: int, group: int, vgroup: int, scale: float,
                     residual: int | None, triton_ok: bool | None = None, fuse: int | None = None) -> torch.Tensor:
    """One layer's decode step after the new key/value went to row ``at`` of k, v: attention over the quantized rows
    and the residual [rs, at], then (in place) the residual's oldest group quantized when it holds residual + group
    rows (``residual=None``: never, KIVI's ``decode_cache=temp``). CUDA: the Triton kernels, packed values
    token-major (``values_to_words``; ``fuse``, default ``FUSE_FLUSH``); elsewhere (or ``triton_ok=False``) the torch
    reference ops on the standard layout."""
    bufs = (kp, ks, kz, vp, vs, vz)
    use = _use_triton(q, bits, group, vgroup) if triton_ok is None else triton_ok
    mode = int(FUSE_FLUSH if fuse is None else fuse)
    if residual is None:  # attention only
        if use:
            return kivi_attention_triton(q, *bufs, k, v, nq, rs, at, bits=bits, group=group, vgroup=vgroup,
                                         scale=scale, re_add=1)
        return kivi_attention_torch(q, *bufs, k, v, nq, rs, at + 1, bits=bits, group=group, vgroup=vgroup, scale=scale)
    if use and mode:
        return kivi_attention_triton(q, *bufs, k, v, nq, rs, at, bits=bits, group=group, vgroup=vgroup, scale=scale,
                                     re_add=1, flush_residual=residual, one=int(mode == 2))
    if use:
        out = kivi_attention_triton(q, *bufs, k, v, nq, rs, at, bits=bits, group=group, vgroup=vgroup, scale=scale,
                                    re_add=1)
        kivi_flush_triton(k, v, *bufs, nq, rs, at, bits=bits, group=group, vgroup=vgroup, residual=residual, re_add=1)
        return out
    re = at + 1
    out = kivi_attention_torch(q, *bufs, k, v, nq, rs, re, bits=bits, group=group, vgroup=vgroup, scale=scale)
    kivi_flush_torch(k, v, *bufs, nq, rs, re, bits=bits, group=group, vgroup=vgroup, residual=residual)
    return out
