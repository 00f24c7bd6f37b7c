"""Vertical-slash's pattern estimate on the GPU: the attention mass of the last queries per key column and per
diagonal (``methods.vertical_slash.line_scores`` is the torch reference and the path elsewhere).

The reference softmaxes a float32 copy of the [Hq, n, Tk + n] score block (reversed, padded keys so that every
diagonal is a column of one strided view): ~8 GB of memory traffic at 131,072 keys, 4.0 ms per layer on an H200
(``scripts/profile_vs_prefill.py``). Here the scores stay the bf16 product (as the reference computes them), one
launch takes each causal row's log-sum-exp, and one more sums the probabilities per column and per diagonal from
two loads of the same scores (a straight tile and a tile skewed by one key per row), so the scores are read three
times and nothing of their size is written. Sums run in float32 in another order than torch's: equal to the
reference within float32 rounding (tests/methods/test_vs_lines.py, Triton's interpreter on CPU and CUDA). The
lengths are not specialised on: the engine's warm-up on short prompts compiles what a 128K prefill runs.
"""
from __future__ import annotations

import torch

from scbench.kernels.paged_decode import triton

SUMS_CONFIG = (64, 4)
"""(indices per program, warps) of the sums kernel. On the H200 at 131,072 keys the whole estimate took 1.77 ms with
64:4 against 1.96-2.06 with 128:8, 2.67 with 128:4, 2.88 with 256:4 or 256:8, 3.24 with 512:8
(``scripts/profile_vs_prefill.py --sums-configs``, results/perf/vs_profile_sums.json)."""

if triton is not None:
    import triton.language as tl

    @triton.jit(do_not_specialize=["tk", "n"])
    def _row_lse(S, LSE, tk, n, scale, CH: tl.constexpr):
        """Log-sum-exp of one score row (query r of n, at position tk - n + r) over its causal keys."""
        row = tl.program_id(0)
        r = row % n
        last = tk - n + r
        base = S + row.to(tl.int64) * tk
        m = float("-inf")
        acc = 0.0
        for j0 in range(0, tk, CH):
            j = j0 + tl.arange(0, CH)
            ok = j <= last
            s = tl.load(base + j, mask=ok, other=float("-inf")).to(tl.float32) * scale
            m_new = tl.maximum(m, tl.max(s, 0))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.where(ok, tl.exp(s - m_new), 0.0), 0)
            m = m_new
        tl.store(LSE + row, m + tl.log(acc))

    @triton.jit(do_not_specialize=["tk", "n"])
    def _line_sums(S, LSE, V, SL, tk, n, scale, NP: tl.constexpr, BJ: tl.constexpr):
        """Per head and block of BJ indices: column sums (keys j) and diagonal sums (d = position - key) of the
        softmax probabilities of the head's n rows."""
        h, jb = tl.program_id(0), tl.program_id(1)
        r = tl.arange(0, NP)
        x = jb * BJ + tl.arange(0, BJ)
        rows = r < n
        lse = tl.load(LSE + h * n + r, mask=rows, other=0.0)
        base = S + (h * n + r).to(tl.int64)[:, None] * tk
        last = (tk - n + r)[:, None]
        ok = rows[:, None] & (x[None, :] < tk) & (x[None, :] <= last)
        s = tl.load(base + x[None, :], mask=ok, other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp(s * scale - lse[:, None]), 0.0)
        tl.store(V + h.to(tl.int64) * tk + x, tl.sum(p, 0), mask=x < tk)
        j = last - x[None, :]  # key of diagonal x in row r
        ok = rows[:, None] & (x[None, :] < tk) & (j >= 0)
        s = tl.load(base + j, mask=ok, other=0.0).to(tl.float32)
        p = tl.where(ok, tl.exp(s * scale - lse[:, None]), 0.0)
        tl.store(SL + h.to(tl.int64) * tk + x, tl.sum(p, 0), mask=x < tk)


def line_scores_triton(q: torch.Tensor, k: torch.Tensor, scale: float,
                       last_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``methods.vertical_slash.line_scores``: q [Hq, Tq, D], k [Hkv, Tk, D] -> (vertical [Hq, Tk],
    slash [Hq, Tk]) float32."""
    hq, tq = q.shape[0], q.shape[1]
    hkv, tk = k.shape[0], k.shape[1]
    n = min(last_q, tq)
    qs = q[:, tq - n:].reshape(hkv, hq // hkv * n, -1)
    s = (qs @ k.transpose(-1, -2)).contiguous()  # [Hkv, G*n, Tk]: head h's rows at h*n .. h*n+n-1
    lse = torch.empty(hq * n, dtype=torch.float32, device=q.device)
    _row_lse[(hq * n,)](s, lse, tk, n, float(scale), CH=2048, num_warps=4)
    vertical = torch.empty(hq, tk, dtype=torch.float32, device=q.device)
    slash = torch.empty_like(vertical)
    bj, warps = SUMS_CONFIG
    _line_sums[(hq, triton.cdiv(tk, bj))](s, lse, vertical, slash, tk, n, float(scale),
                                         NP=max(16, triton.next_power_of_2(n)), BJ=bj, num_warps=warps)
    return vertical, slash

