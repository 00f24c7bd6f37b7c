"""The merge step of split-KV (flash-decoding) attention: partial outputs, maxima and sums of the key splits of one
(batch x KV head) combined into the softmax-weighted result. Shared by the decode kernels in scbench/engines/fastdecode.py
and scbench/kernels/{paged_decode,kivi_decode}.py."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install (callers check for Triton first)
    triton = None

if triton is not None:

    @triton.jit
    def _combine_kernel(Part, Mx, Sm, Out, n_splits, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                        NS: tl.constexpr):
        """Merge the splits of one (batch x KV head, query head of the group): softmax-weighted partial sums."""
        merge_splits(Part, Mx, Sm, Out, n_splits, tl.program_id(0), tl.program_id(1), G, GP, D, NS)

    @triton.jit
    def merge_splits(Part, Mx, Sm, Out, n_splits, bh, g, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                     NS: tl.constexpr):
        """The body of ``_combine_kernel`` for program (bh, g), callable from other kernels' combine steps."""
        sp, cols = tl.arange(0, NS), tl.arange(0, D)
        used = sp < n_splits
        idx = (bh * n_splits + sp) * GP + g
        m = tl.load(Mx + idx, mask=used, other=float("-inf"))
        top = tl.max(m, 0)
        w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
        total = tl.sum(w * tl.load(Sm + idx, mask=used, other=0.0), 0)
        part = tl.load(Part + idx[:, None] * D + cols[None, :], mask=used[:, None], other=0.0)
        res = tl.sum(w[:, None] * part, 0) / total
        tl.store(Out + (bh * G + g) * D + cols, res.to(Out.dtype.element_ty))
