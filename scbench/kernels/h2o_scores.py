"""H2O's accumulated attention scores blockwise (Triton, CUDA): never the attention matrix.

A token's score is ``sum over queries and the KV group's query heads of exp(q.k * scale - lse(q))``, where
``lse(q)`` is the log-sum-exp of the query's causal scores. The dense prefill forward already computes every
``lse`` (flash attention keeps it for its backward): ``scbench/kernels/dense.causal_attention_lse`` returns it and
the attention function attaches it to the captured queries (``queries.scbench_lse``), so only one pass remains:
``_colsum_kernel`` walks, for a block of keys, the query blocks at or after the diagonal (blocks entirely below
it, unmasked; never the blocks above it) for each query head of the KV group, keeping the key block in
registers, and accumulates ``exp2(s * scale * log2(e) - lse * log2(e))`` in a float32 tile reduced once at the
end. Without a forward log-sum-exp (a later turn's masked prefill, chunked queries, float32) ``_lse_kernel``
computes it first (one more pass, as before). Scores are bf16/fp16 products accumulated in float32 (tensor
cores); the reference is ``methods.h2o.accumulated_attention`` (float32 torch ops, the CPU path), which tests
compare on CUDA and, on CPU tensors, through the Triton interpreter (``TRITON_INTERPRET=1``).

The same two passes with a maximum instead of the sum (``reduce="max"``) give KVzip's scores (the largest softmax
weight a key receives over the repeat queries and the group's query heads, ``methods/reconstruction.py``).
"""
from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("SCBENCH_H2O_KERNEL", "1") != "0"
"""CUDA: H2O scores through these kernels (``SCBENCH_H2O_KERNEL=0``: the torch reference)."""

LOG2E = 1.4426950408889634

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _exp2_poly(x):
        """2 ** x on the FMA units (x <= 0): 2 ** round(x) in the exponent bits times a degree-5 polynomial of the
        remainder in [-0.5, 0.5] (relative error < 3e-6); x below -126 gives 2 ** -126 (negligible, not 0)."""
        x = tl.maximum(x, -126.0)
        t = x + 12582912.0  # 1.5 * 2 ** 23: round to nearest, the integer in the low mantissa bits
        f = x - (t - 12582912.0)
        p = 1.3333558e-3 * f + 9.6181291e-3
        p = p * f + 5.5504109e-2
        p = p * f + 0.24022651
        p = p * f + 0.69314718
        p = p * f + 1.0
        bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _exp2(x, EXP: tl.constexpr):
        """2 ** x of a [BM, BN] tile: EXP 0 the special-function units (ex2.approx), 1 the polynomial on the FMA
        units, 2 half the columns each (the two run in parallel)."""
        if EXP == 0:
            return tl.exp2(x)
        elif EXP == 1:
            return _exp2_poly(x)
        else:
            BM: tl.constexpr = x.shape[0]
            BN: tl.constexpr = x.shape[1]
            a, b = tl.split(tl.reshape(x, [BM, BN // 2, 2]))
            return tl.reshape(tl.join(tl.exp2(a), _exp2_poly(b)), [BM, BN])

    @triton.jit(do_not_specialize=["n", "w"])  # one compile (the warm-up's) for every prompt length
    def _lse_kernel(Q, K, L, n, w, scale2, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        """(batch x query head, block of BM queries): natural log-sum-exp of each query's causal scores."""
        bq, mb = tl.program_id(0), tl.program_id(1)
        b, h = bq // HQ, bq % HQ
        kvh = h // (HQ // HKV)
        rows = mb * BM + tl.arange(0, BM)
        cols = tl.arange(0, D)
        qin = rows < w
        q = tl.load(Q + bq.to(tl.int64) * w * D + rows[:, None].to(tl.int64) * D + cols[None, :], mask=qin[:, None],
                    other=0.0)
        pos = n - w + rows
        m = tl.full([BM], -1.0e30, tl.float32)
        s_sum = tl.zeros([BM], tl.float32)
        kbase = (b * HKV + kvh).to(tl.int64) * n * D
        for start in range(0, n - w + mb * BM + BM, BN):  # keys past n are masked below
            keys = start + tl.arange(0, BN)
            k = tl.load(K + kbase + keys[:, None].to(tl.int64) * D + cols[None, :], mask=(keys < n)[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
            s = tl.where((keys[None, :] <= pos[:, None]) & (keys[None, :] < n), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            s_sum = s_sum * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m = m_new
        tl.store(L + bq.to(tl.int64) * w + rows, (m + tl.log2(s_sum)) / 1.4426950408889634, mask=qin)

    @triton.jit(do_not_specialize=["n", "w"])
    def _colsum_kernel(Q, K, L, Out, n, w, scale2, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, EXP: tl.constexpr = 0,
                       MAX: tl.constexpr = False):
        """(batch x KV head, block of BN keys): sum (``MAX``: maximum) over the group's query heads and the queries
        at or after the block of exp(score - lse); ``L`` holds natural log-sum-exps, ``scale2`` = scale * log2(e)."""
        bk, nb = tl.program_id(0), tl.program_id(1)
        b, kvh = bk // HKV, bk % HKV
        G: tl.constexpr = HQ // HKV
        off = n - w  # position of query row 0
        keys = nb * BN + tl.arange(0, BN)
        cols = tl.arange(0, D)
        k = tl.load(K + bk.to(tl.int64) * n * D + keys[:, None].to(tl.int64) * D + cols[None, :],
                    mask=(keys < n)[:, None], other=0.0)
        kt = tl.trans(k)
        acc = tl.zeros([BM, BN], tl.float32)
        # query rows >= lo see some key of the block, rows >= hi see all of them (row r sits at position off + r)
        lo = nb * BN - off
        lo = lo * (lo > 0)
        lo = lo // BM * BM
        hi = nb * BN + BN - 1 - off
        hi = hi * (hi > 0)
        hi = (hi + BM - 1) // BM * BM
        for g in range(G):
            bq = (b * HQ + kvh * G + g).to(tl.int64)
            qb = Q + bq * w * D
            lb = L + bq * w
            for start in range(lo, hi, BM):  # blocks on the diagonal: causal mask
                rows = start + tl.arange(0, BM)
                qin = rows < w
                q = tl.load(qb + rows[:, None].to(tl.int64) * D + cols[None, :], mask=qin[:, None], other=0.0)
                lse = tl.load(lb + rows, mask=qin, other=float("inf")) * 1.4426950408889634
                s = tl.dot(q, kt, input_precision=PREC)
                p = tl.where(keys[None, :] <= (off + rows)[:, None], _exp2(s * scale2 - lse[:, None], EXP), 0.0)
                if MAX:
                    acc = tl.maximum(acc, p)
                else:
                    acc += p
            for start in range(hi, w, BM):  # blocks below the diagonal: every query sees every key
                rows = start + tl.arange(0, BM)
                qin = rows < w
                q = tl.load(qb + rows[:, None].to(tl.int64) * D + cols[None, :], mask=qin[:, None], other=0.0)
                lse = tl.load(lb + rows, mask=qin, other=float("inf")) * 1.4426950408889634
                s = tl.dot(q, kt, input_precision=PREC)
                p = _exp2(s * scale2 - lse[:, None], EXP)  # rows past w: (about) 0
                if MAX:
                    acc = tl.maximum(acc, p)
                else:
                    acc += p
        if MAX:
            tl.store(Out + bk.to(tl.int64) * n + keys, tl.max(acc, 0), mask=keys < n)
        else:
            tl.store(Out + bk.to(tl.int64) * n + keys, tl.sum(acc, 0), mask=keys < n)


CONFIG = {"bf16": dict(BM=64, BN=128, num_warps=4, num_stages=3, EXP=0),
          "fp32": dict(BM=32, BN=64, num_warps=4, num_stages=2, EXP=0)}
"""Column-sum tiles per dtype. bf16 chosen by scripts/bench_h2o_prefill.py on an H200 (8B layer, 32K): 8.3 ms with
one warpgroup (several blocks per SM overlap tensor cores and exp2) against 11.3-14.9 ms for 8-16 warps, 64-key
blocks or exp2 on the FMA units (EXP 1: 14.9 ms; EXP 2, half each: 9.6 ms with 4 warps)."""


CONFIG_MAX = {"bf16": dict(BM=64, BN=64, num_warps=4, num_stages=3, EXP=0), "fp32": CONFIG["fp32"]}
"""Max-reduction tiles (KVzip: ~4K keys, ~2K repeat queries, 32 / 8 heads): H200, scripts/bench_kvzip_duo.py, both
passes of one layer's 2,075-query chunk: 0.353 ms with 64-key blocks against 0.454 ms with the column sums' 128
(more programs for a short key range; 128 x 64 with 8 warps 0.359 ms, 64 x 128 with 8 warps 0.464 ms)."""


def accumulated_attention_triton(keys: torch.Tensor, queries: torch.Tensor, scale: float | None = None,
                                 lse: torch.Tensor | None = None, config: dict | None = None,
                                 reduce: str = "sum", ncols: int | None = None) -> torch.Tensor:
    """keys [B, Hkv, n, D]; queries [B, Hq, w, D] (positions n - w ... n - 1) -> [B, Hkv, n] float32.

    ``lse`` [B, Hq, w] float32: each query's natural log-sum-exp over its causal scores (from the dense forward);
    None: computed here by one more pass. ``config``: the column-sum tiles (default ``CONFIG``). ``reduce``: "sum"
    (H2O: accumulated attention) or "max" (KVzip: the largest weight a key receives over queries and the group's
    query heads). ``ncols``: score only keys [0, ncols) (the rest of the output is left unset; the log-sum-exps
    still run over all n keys)."""
    b, hkv, n, d = keys.shape
    hq, w = queries.shape[1], queries.shape[2]
    if queries.shape[0] != b or queries.shape[3] != d or hq % hkv or w > n:
        raise ValueError(f"H2O scores: queries {tuple(queries.shape)} do not fit keys {tuple(keys.shape)}")
    scale = d**-0.5 if scale is None else scale
    q, k = queries.contiguous(), keys.contiguous()
    if q.dtype != k.dtype:
        q = q.to(k.dtype)
    prec = "ieee" if k.dtype == torch.float32 else "tf32"
    if lse is None:
        bm, bn = (64, 64) if k.dtype == torch.float32 else (128, 64)
        lse = torch.empty(b, hq, w, dtype=torch.float32, device=k.device)
        _lse_kernel[(b * hq, triton.cdiv(w, bm))](q, k, lse, n, w, scale * LOG2E, HQ=hq, HKV=hkv, D=d, BM=bm, BN=bn,
                                                  PREC=prec, num_warps=8 if bm == 128 else 4)
    elif lse.shape != (b, hq, w):
        raise ValueError(f"H2O scores: lse {tuple(lse.shape)} for queries {tuple(queries.shape)}")
    lse = lse.float().contiguous()
    cfg = dict(config or (CONFIG_MAX if reduce == "max" else CONFIG)["fp32" if k.dtype == torch.float32 else "bf16"])
    bn = cfg["BN"]
    if reduce not in ("sum", "max"):
        raise ValueError(f"attention scores: reduce must be 'sum' or 'max', got {reduce!r}")
    ncols = n if ncols is None else ncols
    if not 0 < ncols <= n:
        raise ValueError(f"attention scores: ncols {ncols} outside (0, {n}]")
    out = torch.empty(b, hkv, n, dtype=torch.float32, device=k.device)
    _colsum_kernel[(b * hkv, triton.cdiv(ncols, bn))](q, k, lse, out, n, w, scale * LOG2E, HQ=hq, HKV=hkv, D=d,
                                                      PREC=prec, MAX=reduce == "max", **cfg)
    return out
