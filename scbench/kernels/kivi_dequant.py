"""De-quantisation of KIVI's packed chunks in one kernel per chunk, straight into the layer's attention input.

A query feed over a KIVI cache (a later turn's prompt, a multi-request query) attends over the whole layer:
``scbench.kv.quant.KIVILayer.update`` returns the de-quantised prefix followed by the exact residual. The torch
path (``scbench.kv.quant.dequantize``) unpacks to uint8, widens to float32 and applies scale and zero point in
separate passes, then concatenates the chunks: at 131K tokens on the H200 ~150 ms per query feed over 32 layers.
``dequantize_into`` reads each packed byte once and writes the output dtype directly at the chunk's token offset
of one preallocated tensor.

Exactness: an element is ``q * scale + zero`` in float32 rounded to the output dtype, as in ``dequantize``. ``q``
is an integer below 16 and ``scale`` a 16-bit float (8 or 11 significant bits), so ``q * scale`` is exact in
float32 and a fused multiply-add rounds the same sum once: the kernel equals the torch path bit for bit
(tests/methods/test_kivi_dequant.py, in the Triton interpreter on CPU and on CUDA).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def usable(out: torch.Tensor) -> bool:
    """Whether ``dequantize_into`` can write ``out`` (Triton importable, a power-of-two head size)."""
    d = out.shape[-1]
    return triton is not None and d & (d - 1) == 0


def dequantize_into(out: torch.Tensor, at: int, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *,
                    bits: int, group: int, axis: int) -> None:
    """Write ``scbench.kv.quant.dequantize(packed, scale, zero, bits, group, axis, out.dtype)`` into
    ``out[:, :, at:at + T]`` with the Triton kernel (CUDA, or the interpreter on CPU tensors; see ``usable``).

    out: [B, H, n, D] (contiguous in its last dim); packed uint8 [B, H, T, D * bits // 8]; scale/zero
    [B, H, T / group, D] (keys, ``axis=-2``) or [B, H, T, D / group] (values, ``axis=-1``); strided views are
    fine."""
    b, h, t, db = packed.shape
    d = out.shape[-1]
    if db * 8 != d * bits or out.shape[:2] != (b, h) or at + t > out.shape[2]:
        raise ValueError(f"dequantize_into: packed {tuple(packed.shape)} at {bits} bits does not fit out "
                         f"{tuple(out.shape)} at token {at}")
    if not usable(out):
        raise RuntimeError("dequantize_into: needs Triton and a power-of-two head size (else kv.quant.dequantize)")
    if t == 0:
        return
    if out.stride(-1) != 1 or packed.stride(-1) != 1 or scale.stride(-1) != 1 or zero.stride(-1) != 1:
        raise ValueError("dequantize_into: the last dimension of every tensor must be contiguous")
    if scale.stride() != zero.stride():
        zero = zero.contiguous()
        scale = scale.contiguous()
    bt = 32
    grid = (b * h, triton.cdiv(t, bt))
    _dequant_kernel[grid](packed, scale, zero, out, t, h, at, *packed.stride()[:3], *scale.stride()[:3],
                          *out.stride()[:3], BITS=bits, G=group, KEYS=axis == -2, D=d, BT=bt)


if triton is not None:

    @triton.jit
    def _dequant_kernel(P, S, Z, Out, T, H, AT, p_b, p_h, p_t, s_b, s_h, s_t, o_b, o_h, o_t, BITS: tl.constexpr,
                        G: tl.constexpr, KEYS: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        t = tl.program_id(1) * BT + tl.arange(0, BT)[:, None]
        c = tl.arange(0, D)[None, :]
        ok = (t < T) & (c < D)
        PER: tl.constexpr = 8 // BITS
        byte = tl.load(P + b.to(tl.int64) * p_b + h * p_h + t.to(tl.int64) * p_t + c // PER, mask=ok, other=0)
        q = (byte.to(tl.int32) >> ((c % PER) * BITS)) & ((1 << BITS) - 1)
        if KEYS:  # per channel, groups of G tokens: scale [T / G, D]
            si = b.to(tl.int64) * s_b + h * s_h + (t // G).to(tl.int64) * s_t + c
        else:  # per token, groups of G channels: scale [T, D / G]
            si = b.to(tl.int64) * s_b + h * s_h + t.to(tl.int64) * s_t + c // G
        s = tl.load(S + si, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(Z + si, mask=ok, other=0.0).to(tl.float32)
        x = q.to(tl.float32) * s + z  # q * s exact in float32: one rounding either way
        tl.store(Out + b.to(tl.int64) * o_b + h * o_h + (AT + t).to(tl.int64) * o_t + c,
                 x.to(Out.dtype.element_ty), mask=ok)
