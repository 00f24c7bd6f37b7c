"""Fused elementwise kernels of one decode step (one token, batch 1): each replaces a handful of small launches.

- ``rmsnorm(x, weight, eps, residual=None)``: RMSNorm, optionally of ``x + residual`` (then also returns the sum,
  the next residual): one kernel instead of ~7 (add, cast, pow, mean, add, rsqrt, mul, cast, mul);
- ``silu_mul(gate_up)``: ``silu(gate) * up`` over the fused gate/up projection's output: one kernel instead of 2
  (plus the two slices' copies);
- ``rope_store(qkv, cos, sin, kbuf, vbuf, at)``: rotary embedding of the query and key heads of the fused q/k/v
  projection's output, the query written out and the key/value written into the layer's cache buffers at row
  ``at``: one kernel instead of ~14 (views, transposes, rotate_half's slices/neg/cat, 6 products/sums, index_copy x2).

Each has a plain torch reference (``*_ref``) computing exactly what the Hugging Face Llama modules compute,
rounding to the input dtype where they round; the Triton kernels follow the same roundings (so bf16 results
match the modules up to the order of the RMS sum). On CPU, or without Triton, the references run.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's CPU interpreter is on: the kernels may take CPU tensors (tests)."""
CPU_KERNELS = INTERPRET and os.environ.get("SCBENCH_CPU_KERNELS", "1") != "0"
"""Under the interpreter, CPU tensors of a decode step go through these kernels (and the batched step's rotary
kernel, ``shared_prefix.rope_store_rows``) rather than the references: every decode of a test becomes an
integration test of the kernels, two to three times slower. ``SCBENCH_CPU_KERNELS=0`` keeps the references:
tests/conftest.py starts the suite so and turns the kernels on for the tests that ask for them (marker
``cpu_kernels``, or the ``interpreted`` fixtures)."""


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for ``x`` (CUDA with Triton, or CPU tensors under the interpreter in tests)."""
    return triton is not None and (x.is_cuda or CPU_KERNELS)


# --- references ---------------------------------------------------------------------------------------------
def rmsnorm_ref(x, weight, eps, residual=None):
    """Hugging Face's LlamaRMSNorm of ``x`` (or of ``residual + x``, returned as well as the new residual)."""
    if residual is not None:
        x = residual + x
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)


def silu_mul_ref(gate_up):
    """``silu(gate) * up`` for ``gate_up`` = [..., 2I] (gate first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_store_ref(qkv, cos, sin, kbuf, vbuf, at, hq: int, hkv: int):
    """qkv: [1, 1, (hq + 2 hkv) D]; cos, sin: [1, 1, D]; kbuf, vbuf: [1, hkv, C, D]; at: int64 [1] -> q [1, hq, 1, D].
    As LlamaAttention + StaticKV.update: rotary embedding of q and k, k and v written at row ``at``."""
    d = kbuf.shape[-1]
    q, k, v = qkv.view(1, 1, hq + 2 * hkv, d).transpose(1, 2).split([hq, hkv, hkv], dim=1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = (q * cos) + (rotate_half(q) * sin)
    k = (k * cos) + (rotate_half(k) * sin)
    kbuf.index_copy_(2, at, k)
    vbuf.index_copy_(2, at, v)
    return q


# --- Triton kernels -----------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(X, R, W, Out, ResOut, eps, N, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * N + cols, mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(R + row * N + cols, mask=m, other=0.0)
            x = (r.to(tl.float32) + x.to(tl.float32)).to(ResOut.dtype.element_ty)
            tl.store(ResOut + row * N + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, 0) / N
        y = (xf * (1.0 / tl.sqrt(var + eps))).to(Out.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Out + row * N + cols, (w * y).to(Out.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(GU, Out, I, BLOCK: tl.constexpr):
        row, blk = tl.program_id(0), tl.program_id(1)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        m = cols < I
        g = tl.load(GU + row * 2 * I + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(GU + row * 2 * I + I + cols, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(Out.dtype.element_ty).to(tl.float32)
        tl.store(Out + row * I + cols, (s * u).to(Out.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_store_kernel(QKV, Cos, Sin, Q, Kb, Vb, At, C, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
        h = tl.program_id(0)
        d = tl.arange(0, D)
        half = D // 2
        at = tl.load(At)
        x = tl.load(QKV + h * D + d)
        dt = x.dtype
        if h < HQ + HKV:  # a query or key head: rotate
            partner = tl.load(QKV + h * D + tl.where(d < half, d + half, d - half)).to(tl.float32)
            rot = tl.where(d < half, -partner, partner)
            c = tl.load(Cos + d).to(tl.float32)
            s = tl.load(Sin + d).to(tl.float32)
            a = (x.to(tl.float32) * c).to(dt).to(tl.float32)
            b = (rot * s).to(dt).to(tl.float32)
            y = (a + b).to(dt)
            if h < HQ:
                tl.store(Q + h * D + d, y)
            else:
                tl.store(Kb + (h - HQ).to(tl.int64) * C * D + at * D + d, y)
        else:  # a value head: copy into the buffer
            tl.store(Vb + (h - HQ - HKV).to(tl.int64) * C * D + at * D + d, x)


# --- entry points: Triton where it runs, else the reference ------------------------------------------------
def rmsnorm(x, weight, eps, residual=None):
    """See ``rmsnorm_ref``; x (and residual): [..., N] contiguous, weight [N] of x's dtype."""
    if not use_triton(x) or weight.dtype != x.dtype or (residual is not None and residual.dtype != x.dtype):
        return rmsnorm_ref(x, weight, eps, residual)  # mixed dtypes promote: the reference does it the modules' way
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    n = x.shape[-1]
    out = torch.empty_like(x)
    res = torch.empty_like(x) if residual is not None else out
    _rmsnorm_kernel[(x.numel() // n,)](x, residual if residual is not None else x, weight, out, res, eps, n,
                                       HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n),
                                       num_warps=8 if n >= 2048 else 4)
    return out if residual is None else (out, res)


def silu_mul(gate_up):
    """See ``silu_mul_ref``."""
    if not use_triton(gate_up):
        return silu_mul_ref(gate_up)
    gate_up = gate_up.contiguous()
    i = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * i)
    out = gate_up.new_empty(*gate_up.shape[:-1], i)
    block = min(2048, triton.next_power_of_2(i))
    _silu_mul_kernel[(rows, triton.cdiv(i, block))](gate_up, out, i, BLOCK=block, num_warps=4)
    return out


def rope_store(qkv, cos, sin, kbuf, vbuf, at, hq: int, hkv: int):
    """See ``rope_store_ref``; kbuf, vbuf contiguous, head dim a power of two."""
    if not use_triton(qkv):
        return rope_store_ref(qkv, cos, sin, kbuf, vbuf, at, hq, hkv)
    d = kbuf.shape[-1]
    q = qkv.new_empty(1, hq, 1, d)
    _rope_store_kernel[(hq + 2 * hkv,)](qkv, cos, sin, q, kbuf, vbuf, at, kbuf.shape[2], HQ=hq, HKV=hkv, D=d,
                                        num_warps=1)
    return q
