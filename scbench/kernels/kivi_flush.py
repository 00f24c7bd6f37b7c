"""KIVI's residual flush in a decode step: when the full-precision residual holds ``residual + group`` rows, its
oldest group is quantized (keys per channel, values per token, ``scbench.kv.quant.quantize``) into the next packed
rows and the counters move, each write selected on the device (no host sync, capturable in a graph).
``kivi_flush_torch`` is the reference (torch ops, the CPU path, ``quantize``'s layout); ``kivi_flush_triton`` one
kernel plus a counter kernel, writing the values token-major as the attention kernel reads them
(``values_to_words``); ``_flush_group`` is also called by ``scbench.kernels.kivi_decode``'s attention kernel
(``FUSE_FLUSH``)."""
from __future__ import annotations

import os

import torch

from scbench.kv.quant import pack, quantize, unpack

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


if triton is not None:

    @triton.jit
    def _quant_pack(x, lo, hi, LEVELS: tl.constexpr, DT: tl.constexpr):
        """x [..] float32 with broadcast (lo, hi) -> (q as int32, scale, zero), as ``scbench.kv.quant.quantize``."""
        zero = lo.to(DT).to(tl.float32)
        scale = tl.math.div_rn(hi - zero, tl.zeros_like(hi) + LEVELS).to(DT).to(tl.float32)
        safe = tl.where(scale > 0, scale, 1.0)
        return scale, zero, safe

    @triton.jit
    def _round_even(x):
        """Round half to even, as ``torch.round`` (x >= 0 here)."""
        f = tl.floor(x)
        d = x - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))

    @triton.jit
    def _kivi_flush_kernel(K, V, KP, KS, KZ, VP, VS, VZ, NQ, RS, RE, C, CQ, full_len, re_add,
                           D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr,
                           DT: tl.constexpr):
        """(batch x KV head): when the residual [rs, re) holds ``full_len`` rows, quantize and pack its oldest GROUP
        rows (keys per channel, values per token) into quantized row nq. Counters move in ``_kivi_count_kernel``."""
        bh = tl.program_id(0).to(tl.int64)
        nq = tl.load(NQ).to(tl.int32)
        rs = tl.load(RS).to(tl.int32)
        re = tl.load(RE).to(tl.int32) + re_add
        if re - rs == full_len:
            _flush_group(K, V, KP, KS, KZ, VP, VS, VZ, bh, nq, rs, C, CQ, D, BITS, GROUP, VGROUP, DT)

    @triton.jit
    def _flush_group(K, V, KP, KS, KZ, VP, VS, VZ, bh, nq, rs, C, CQ, D: tl.constexpr, BITS: tl.constexpr,
                     GROUP: tl.constexpr, VGROUP: tl.constexpr, DT: tl.constexpr):
        """Quantize and pack rows [rs, rs + GROUP) of K, V (bh's [C, D] slice) into quantized row nq."""
        PER: tl.constexpr = 8 // BITS
        DB: tl.constexpr = D // PER
        NV: tl.constexpr = D // VGROUP
        LEVELS: tl.constexpr = (1 << BITS) - 1
        rows, cols = tl.arange(0, GROUP), tl.arange(0, D)
        src = bh * C * D + (rs + rows)[:, None].to(tl.int64) * D + cols[None, :]
        shifts = tl.arange(0, PER) * BITS
        drow = (nq + rows)[:, None].to(tl.int64)
        # keys: one group per channel
        k = tl.load(K + src).to(tl.float32)
        scale, zero, safe = _quant_pack(k, tl.min(k, 0), tl.max(k, 0), LEVELS, DT)
        qk = tl.minimum(tl.maximum(_round_even(tl.math.div_rn(k - zero[None, :], safe[None, :] + tl.zeros_like(k))),
                                   0.0), LEVELS * 1.0).to(tl.int32)
        packed = tl.sum(tl.reshape(qk, [GROUP, DB, PER]) << shifts[None, None, :], 2).to(tl.uint8)
        tl.store(KP + bh * CQ * DB + drow * DB + tl.arange(0, DB)[None, :], packed)
        kg = bh * (CQ // GROUP) * D + (nq // GROUP) * D + cols
        tl.store(KS + kg, scale.to(DT))
        tl.store(KZ + kg, zero.to(DT))
        # values: one group per VGROUP channels of a token
        v3 = tl.reshape(tl.load(V + src).to(tl.float32), [GROUP, NV, VGROUP])
        vscale, vzero, vsafe = _quant_pack(v3, tl.min(v3, 2), tl.max(v3, 2), LEVELS, DT)
        qv = tl.minimum(tl.maximum(_round_even(tl.math.div_rn(v3 - vzero[:, :, None], vsafe[:, :, None] + tl.zeros_like(v3))), 0.0),
                        LEVELS * 1.0).to(tl.int32)
        # token-major (``values_to_words``): per chunk of T tokens one int32 word per channel, token k in bits k * BITS
        T: tl.constexpr = 32 // BITS
        qv = tl.reshape(qv, [GROUP // T, T, D])
        words = tl.sum(qv << (tl.arange(0, T) * BITS)[None, :, None], 1)  # disjoint bits: the sum is their OR
        chunk = (nq // T + tl.arange(0, GROUP // T))[:, None].to(tl.int64)
        VW = VP.to(tl.pointer_type(tl.int32)) + bh * CQ * (D * BITS // 32)
        tl.store(VW + chunk * D + cols[None, :], words)
        vo = bh * CQ * NV + drow * NV + tl.arange(0, NV)[None, :]
        tl.store(VS + vo, vscale.to(DT))
        tl.store(VZ + vo, vzero.to(DT))

    @triton.jit
    def _kivi_count_kernel(NQ, RS, RE, full_len, re_add, GROUP: tl.constexpr):
        nq, rs, re = tl.load(NQ), tl.load(RS), tl.load(RE) + re_add
        full = re - rs == full_len
        tl.store(NQ, tl.where(full, nq + GROUP, nq))
        tl.store(RS, tl.where(full, rs + GROUP, rs))


def values_to_words(vp: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed values in ``quantize``'s layout uint8 [..., N, D * bits / 8] (N a multiple of T = 32 / bits) -> the
    same bytes token-major, as the attention kernel reads them: per chunk of T tokens, D int32 words (word c holds
    channel c of the chunk's tokens, token k in bits ``k * bits``), the chunk's bytes where its rows were."""
    t = 32 // bits
    q = unpack(vp, bits).unflatten(-2, (vp.shape[-2] // t, t)).transpose(-1, -2).to(torch.int32)  # [.., N/T, D, T]
    # disjoint bit fields: their int32 sum (wrapping past the sign bit) is their OR
    w = (q << (torch.arange(t, device=vp.device, dtype=torch.int32) * bits)).sum(-1, dtype=torch.int32)
    return w.contiguous().view(torch.uint8).reshape(vp.shape)


if triton is not None:

    @triton.jit(do_not_specialize=["n_chunks"])  # one compiled variant for every length (warmed once by the plugin)
    def _to_words_kernel(VP, W, n_chunks, D: tl.constexpr, BITS: tl.constexpr, CH: tl.constexpr):
        """CH chunks of T = 32 / BITS token rows per program: packed bytes [T, D * BITS / 8] -> D int32 words."""
        T: tl.constexpr = 32 // BITS
        PER: tl.constexpr = 8 // BITS
        DB: tl.constexpr = D // PER
        chunk = tl.program_id(0).to(tl.int64) * CH + tl.arange(0, CH)
        tok, col = tl.arange(0, T), tl.arange(0, D)
        row = chunk[:, None, None] * T + tok[None, :, None]
        ok = (chunk < n_chunks)[:, None, None]
        byte = tl.load(VP + row * DB + (col // PER)[None, None, :], mask=ok, other=0).to(tl.int32)
        field = (byte >> ((col % PER) * BITS)[None, None, :]) & ((1 << BITS) - 1)
        words = tl.sum(field << (tok * BITS)[None, :, None], 1)  # disjoint bits: the sum is their OR
        tl.store(W + chunk[:, None] * D + col[None, :], words, mask=(chunk < n_chunks)[:, None])


def values_to_words_fast(vp: torch.Tensor, bits: int, chunks_per_program: int = 4) -> torch.Tensor:
    """``values_to_words`` as one Triton kernel (reads the packed bytes once, writes the words once) on CUDA tensors
    or under Triton's interpreter; the torch ops elsewhere. The plugin converts every loaded chunk with it."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if triton is None or not (vp.is_cuda or interp) or vp.shape[-2] % (32 // bits) or (vp.shape[-1] * 8 // bits) & (
            vp.shape[-1] * 8 // bits - 1):
        return values_to_words(vp, bits)
    src = vp.contiguous()
    d = vp.shape[-1] * 8 // bits
    out = torch.empty(vp.shape, dtype=torch.uint8, device=vp.device)
    n_chunks = src.numel() // (d * bits // 8) // (32 // bits)
    if n_chunks:
        grid = (triton.cdiv(n_chunks, chunks_per_program),)
        _to_words_kernel[grid](src, out.view(torch.int32), n_chunks, D=d, BITS=bits, CH=chunks_per_program)
    return out


def values_from_words(vw: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``values_to_words``."""
    t, d = 32 // bits, vw.shape[-1] * 8 // bits
    w = vw.contiguous().view(torch.int32).reshape(*vw.shape[:-2], vw.shape[-2] // t, d).to(torch.int64)
    q = (w.unsqueeze(-1) >> (torch.arange(t, device=vw.device) * bits)) & (2**bits - 1)  # [.., N/T, D, T]
    return pack(q.transpose(-1, -2).flatten(-3, -2).to(torch.uint8), bits)


def kivi_flush_triton(k, v, kp, ks, kz, vp, vs, vz, nq, rs, re, *, bits: int, group: int, vgroup: int,
                      residual: int, re_add: int = 0) -> None:
    """CUDA, in place: when ``re + re_add - rs == residual + group``, quantize rows [rs, rs + group) of k, v
    [B, H, C, D] into quantized row ``nq`` and advance ``nq`` and ``rs`` by ``group`` (``kivi_flush_torch``; the
    packed values token-major, ``values_to_words``; group a multiple of 32 / bits)."""
    b, h, c, d = k.shape
    cq = kp.shape[2]
    dt = getattr(tl, {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[k.dtype])
    _kivi_flush_kernel[(b * h,)](k, v, kp, ks, kz, vp, vs, vz, nq, rs, re, c, cq, residual + group, re_add, D=d,
                                 BITS=bits, GROUP=group, VGROUP=vgroup, DT=dt)
    _kivi_count_kernel[(1,)](nq, rs, re, residual + group, re_add, GROUP=group)


def kivi_flush_torch(k, v, kp, ks, kz, vp, vs, vz, nq, rs, re, *, bits: int, group: int, vgroup: int,
                     residual: int) -> None:
    """``kivi_flush_triton`` in torch ops (the reference, and the CPU path): ``quantize`` of the oldest residual
    group, each write selected on the device by the full condition."""
    g = group
    full = (re - rs) == residual + g
    rows = nq + torch.arange(g, device=nq.device)
    grp = torch.div(nq, g, rounding_mode="floor")
    f = full.view(1, 1, 1, 1)
    oldest = rs + torch.arange(g, device=nq.device)
    new_k = quantize(k.index_select(2, oldest), bits, g, axis=-2)
    new_v = quantize(v.index_select(2, oldest), bits, vgroup, axis=-1)
    for dst, val, idx in ((kp, new_k[0], rows), (ks, new_k[1], grp), (kz, new_k[2], grp),
                          (vp, new_v[0], rows), (vs, new_v[1], rows), (vz, new_v[2], rows)):
        dst.index_copy_(2, idx, torch.where(f, val, dst.index_select(2, idx)))
    rs.copy_(torch.where(full, rs + g, rs))
    nq.copy_(torch.where(full, nq + g, nq))


def flush_kernel_ok(group: int, vgroup: int, head_dim: int) -> bool:
    """The Triton flush needs power-of-two group sizes and head_dim."""
    return all(x >= 1 and x & (x - 1) == 0 for x in (group, vgroup, head_dim))
