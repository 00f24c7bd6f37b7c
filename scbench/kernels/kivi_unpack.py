"""Unpacking KIVI's packed int32 words in registers for ``scbench.kernels.kivi_decode``: the inline PTX (``unpack_asm``:
each 2/4-bit field OR-ed into the mantissa of a bf16/fp16 constant MAGIC, MAGIC taken off by a packed fma, two fields
per shift where the mantissa holds them) and the Triton side (``_unpack``; ``_perm``: which field each position of an
unpacked row holds, the two 16-bit halves of one 32-bit result being adjacent positions, the pairing the tensor-core
operands take)."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


MAGIC = {torch.bfloat16: (0x4300, "bf16x2", 0x3F80, 0xC300), torch.float16: (0x6400, "f16x2", 0x3C00, 0xE400)}
"""Per storage dtype: the bits of MAGIC (128.0 / 1024.0: an integer x < 2^7 / 2^10 OR-ed into its mantissa reads
MAGIC + x), the packed fma type, 1.0 and -MAGIC."""


def unpack_asm(dtype: torch.dtype, bits: int = 2, mode: int = 1) -> str:
    """The inline PTX of ``_unpack`` (``mode``, the ``asm`` tuning). 1: a 32-bit word holding MAGIC + x in each half
    -> the two halves as x (exact) by one packed fma (x * 1 - MAGIC). 2: from the word $2 and a shift $3: the shift,
    one and-or against MAGIC in a register (lop3), the fma. 3: from the word $4 and a shift $5, two pairs of fields
    (at bits 0 and ``bits`` of each half after the shift: MAGIC + x and MAGIC + x * 2^bits, the second fma scaled by
    2^-bits), outputs $0-$1 and $2-$3; when the second field does not fit the mantissa, mode 2."""
    magic, op, one, neg = MAGIC[dtype]
    lv = (1 << bits) - 1
    bf = dtype == torch.bfloat16
    if mode == 3 and 2 * bits > (7 if bf else 10):
        mode = 2
    two = lambda x: f"{x | x << 16:#x}"  # noqa: E731 (a 16-bit constant in both halves)
    pre = f"mov.b32 o, {two(one)}; mov.b32 m, {two(neg)}; mov.b32 u, {two(magic)}; "
    if mode == 3:
        # 2^-bits and -MAGIC * 2^-bits: exponent fields lowered by bits
        sh = 7 if bf else 10
        q, n = one - (bits << sh), neg - (bits << sh)
        return ("{.reg .b32 o, m, u, q, n, t, a, b; " + pre + f"mov.b32 q, {two(q)}; mov.b32 n, {two(n)}; "
                f"shr.b32 t, $4, $5; lop3.b32 a, t, {two(lv)}, u, 0xea; lop3.b32 b, t, {two(lv << bits)}, u, 0xea; "
                f"fma.rn.{op} a, a, o, m; fma.rn.{op} b, b, q, n; mov.b32 {{$0, $1}}, a; mov.b32 {{$2, $3}}, b;}}")
    if mode == 2:
        return ("{.reg .b32 o, m, t, u; " + pre + f"shr.b32 t, $2, $3; lop3.b32 t, t, {two(lv)}, u, 0xea; "
                f"fma.rn.{op} t, t, o, m; mov.b32 {{$0, $1}}, t;}}")
    return ("{.reg .b32 o, m, t; " f"mov.b32 o, {two(one)}; mov.b32 m, {two(neg)}; "
            f"fma.rn.{op} t, $2, o, m; mov.b32 {{$0, $1}}, t;}}")


if triton is not None:

    @triton.jit
    def _perm(p, T: tl.constexpr):
        """The field (bit offset / bits) of position p's element within its word of T: positions 2f and 2f + 1 hold
        fields f and f + T/2 (the two halves of one 32-bit unpacked result)."""
        return (p // T) * T + (p % 2) * (T // 2) + (p % T) // 2

    @triton.jit
    def _unpack(w, N: tl.constexpr, NWD: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, MAGIC: tl.constexpr,
                ASM: tl.constexpr):
        """int32 words [N, NWD] -> [N, NWD * T] in DT (exact integers), position q of word m = field ``_perm(q)``.
        ASM (bf16 / fp16 on a GPU): per pair of fields (f, f + T/2), one shift and one and-or put them into the
        mantissas of MAGIC in the two 16-bit halves, and ``ASM``'s packed fma takes MAGIC off; the halves become
        positions 2f, 2f + 1 (adjacent elements of the dot's reduction dimension: what one tensor-core operand
        register pairs). Else (float32, the interpreter) shifts and a conversion."""
        T: tl.constexpr = 32 // BITS
        HALF: tl.constexpr = T // 2
        LV: tl.constexpr = (1 << BITS) - 1
        if ASM != "":
            sh = tl.arange(0, HALF) * BITS
            if ASM.startswith("{.reg .b32 o, m, u, q,"):  # mode 3: fields 2a, 2a + 1 of each half from one shift
                sh2 = tl.arange(0, HALF // 2) * (2 * BITS)
                a0, a1, b0, b1 = tl.inline_asm_elementwise(ASM, "=h,=h,=h,=h,r,r", [w[:, :, None], sh2[None, None, :]],
                                                           dtype=(tl.int16, tl.int16, tl.int16, tl.int16),
                                                           is_pure=True, pack=1)
                x = tl.join(tl.join(a0, b0), tl.join(a1, b1)).to(DT, bitcast=True)  # [.., HALF / 2, 2, 2]
                return tl.reshape(x, [N, NWD * T])
            if ASM.startswith("{.reg .b32 o, m, t, u;"):  # mode 2: shift, and-or and fma in the PTX
                lo, hi = tl.inline_asm_elementwise(ASM, "=h,=h,r,r", [w[:, :, None], sh[None, None, :]],
                                                   dtype=(tl.int16, tl.int16), is_pure=True, pack=1)
            else:
                x = ((w[:, :, None] >> sh[None, None, :]) & (LV | (LV << 16))) | (MAGIC | (MAGIC << 16))
                lo, hi = tl.inline_asm_elementwise(ASM, "=h,=h,r", [x], dtype=(tl.int16, tl.int16), is_pure=True,
                                                   pack=1)
            x = tl.join(lo.to(DT, bitcast=True), hi.to(DT, bitcast=True))
        else:
            f = _perm(tl.arange(0, T), T)
            x = ((w[:, :, None] >> (f * BITS)[None, None, :]) & LV).to(DT)
        return tl.reshape(x, [N, NWD * T])
