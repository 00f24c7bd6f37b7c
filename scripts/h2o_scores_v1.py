"""The first H2O score kernels (before the forward's log-sum-exp was reused), kept for scripts/bench_h2o_prefill.py.

Two passes over the causal score blocks of each layer, as flash attention's forward and backward do:
``_lse_kernel`` gives every query row's log-sum-exp (online max / sum over its key blocks), then
``_colsum_kernel`` walks, for a block of keys, the query blocks at or after the diagonal and accumulates
``exp(q.k * scale - lse)`` over the queries and the query heads of the KV group. Scores are bf16/fp16 products
accumulated in float32 (tensor cores); the reference is ``methods.h2o.accumulated_attention`` (float32 torch ops,
the CPU path), which tests compare on CUDA.
"""
from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("SCBENCH_H2O_KERNEL", "1") != "0"
"""CUDA: H2O scores through these kernels (``SCBENCH_H2O_KERNEL=0``: the torch reference)."""

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _lse_kernel(Q, K, L, n, w, scale, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        """(batch x query head, block of BM queries): log-sum-exp of each query's causal scores."""
        bq, mb = tl.program_id(0), tl.program_id(1)
        b, h = bq // HQ, bq % HQ
        kvh = h // (HQ // HKV)
        rows = mb * BM + tl.arange(0, BM)
        cols = tl.arange(0, D)
        qin = rows < w
        q = tl.load(Q + bq.to(tl.int64) * w * D + rows[:, None].to(tl.int64) * D + cols[None, :], mask=qin[:, None],
                    other=0.0)
        pos = n - w + rows
        m = tl.full([BM], float("-inf"), tl.float32)
        s_sum = tl.zeros([BM], tl.float32)
        kbase = (b * HKV + kvh).to(tl.int64) * n * D
        hi = tl.minimum(n - w + mb * BM + BM, n)
        for start in range(0, hi, BN):
            keys = start + tl.arange(0, BN)
            k = tl.load(K + kbase + keys[:, None].to(tl.int64) * D + cols[None, :], mask=(keys < n)[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            s_sum = s_sum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m = m_new
        tl.store(L + bq.to(tl.int64) * w + rows, m + tl.log(s_sum), mask=qin)

    @triton.jit
    def _colsum_kernel(Q, K, L, Out, n, w, scale, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        """(batch x KV head, block of BN keys): sum over the group's query heads and the queries at or after the
        block of exp(score - lse)."""
        bk, nb = tl.program_id(0), tl.program_id(1)
        b, kvh = bk // HKV, bk % HKV
        G: tl.constexpr = HQ // HKV
        keys = nb * BN + tl.arange(0, BN)
        cols = tl.arange(0, D)
        kin = keys < n
        k = tl.load(K + bk.to(tl.int64) * n * D + keys[:, None].to(tl.int64) * D + cols[None, :], mask=kin[:, None],
                    other=0.0)
        acc = tl.zeros([BN], tl.float32)
        first = tl.maximum(nb * BN - (n - w), 0) // BM * BM  # the first query block that can see these keys
        for g in range(G):
            bq = (b * HQ + kvh * G + g).to(tl.int64)
            for start in range(first, w, BM):
                rows = start + tl.arange(0, BM)
                qin = rows < w
                q = tl.load(Q + bq * w * D + rows[:, None].to(tl.int64) * D + cols[None, :], mask=qin[:, None], other=0.0)
                lse = tl.load(L + bq * w + rows, mask=qin, other=float("inf"))
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
                ok = (keys[None, :] <= (n - w + rows)[:, None]) & qin[:, None]
                p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
                acc += tl.sum(p, 0)
        tl.store(Out + bk.to(tl.int64) * n + keys, acc, mask=kin)


def accumulated_attention_triton(keys: torch.Tensor, queries: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """keys [B, Hkv, n, D]; queries [B, Hq, w, D] (positions n - w ... n - 1) -> [B, Hkv, n] float32 (CUDA)."""
    b, hkv, n, d = keys.shape
    hq, w = queries.shape[1], queries.shape[2]
    scale = d**-0.5 if scale is None else scale
    q, k = queries.contiguous(), keys.contiguous()
    if q.dtype != k.dtype:
        q = q.to(k.dtype)
    prec = "ieee" if k.dtype == torch.float32 else "tf32"
    bm, bn = (64, 64) if k.dtype == torch.float32 else (128, 64)
    lse = torch.empty(b * hq, w, dtype=torch.float32, device=k.device)
    _lse_kernel[(b * hq, triton.cdiv(w, bm))](q, k, lse, n, w, scale, HQ=hq, HKV=hkv, D=d, BM=bm, BN=bn, PREC=prec,
                                              num_warps=8 if bm == 128 else 4)
    out = torch.empty(b, hkv, n, dtype=torch.float32, device=k.device)
    _colsum_kernel[(b * hkv, triton.cdiv(n, bn))](q, k, lse, out, n, w, scale, HQ=hq, HKV=hkv, D=d, BM=bm, BN=bn,
                                                  PREC=prec, num_warps=8 if bm == 128 else 4)
    return out
