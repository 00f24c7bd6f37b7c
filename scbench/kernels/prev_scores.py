"""``prev_select.prev_select_triton`` with the scores computed by its first launch (RetrievalAttention's device tier,
methods/retrieval_fast.py, ``select=prev`` on bfloat16 keys): the filter kernel computes each block of q.k (the
group's largest with ``group``), stores it rounded to bfloat16 and appends the candidates above the row's carried
threshold while the scores are in registers; the pick (and the whole-row path) are prev_select.py's. Reference:
``topk`` over the masked scores; tests/unit/test_prev_select.py compares score multisets and the stored scores.
"""
from __future__ import annotations

import os

import torch

from scbench.kernels.prev_select import NB, _buffers, _pick, triton

if triton is not None:
    import triton.language as tl

    from scbench.kernels.prev_select import _append, _span, _threshold

    @triton.jit
    def _score_filter_kernel(Q, Kc, S, N, Thr, Work, Cand, C, K, n_init, n_local, R, margin, G: tl.constexpr,
                             GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr,
                             CAP: tl.constexpr, NBINS: tl.constexpr, ATOMIC: tl.constexpr, F32: tl.constexpr,
                             TILES: tl.constexpr = 1):
        """(batch x KV head, TILES blocks of BN keys): the scores q.k of the group's query heads (GROUP: their max),
        rounded to bfloat16 and stored in S [R, C], and ``prev_select._filter_kernel``'s work on them while in
        registers. F32: the product in float32 (Triton's interpreter multiplies bfloat16 wrongly)."""
        bk, pid = tl.program_id(0), tl.program_id(1)
        n, hi, kk = _span(N, K, n_init, n_local)
        if TILES == 1:
            _score_tile(Q, Kc, S, Thr, Work, Cand, bk, pid, kk, n_init, hi, C, R, margin, G, GP, D, BN, GROUP, CAP,
                        NBINS, ATOMIC, F32)
        else:
            for it in tl.range(0, TILES):
                _score_tile(Q, Kc, S, Thr, Work, Cand, bk, pid * TILES + it, kk, n_init, hi, C, R, margin, G, GP, D, BN,
                            GROUP, CAP, NBINS, ATOMIC, F32)

    @triton.jit
    def _score_tile(Q, Kc, S, Thr, Work, Cand, bk, ch, kk, n_init, hi, C, R, margin, G: tl.constexpr,
                    GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr, CAP: tl.constexpr,
                    NBINS: tl.constexpr, ATOMIC: tl.constexpr, F32: tl.constexpr):
        """Block ch of BN keys of ``_score_filter_kernel``."""
        cols, rows = tl.arange(0, D), tl.arange(0, GP)
        offs = ch * BN + tl.arange(0, BN)
        kt = tl.load(Kc + bk.to(tl.int64) * C * D + offs[:, None] * D + cols[None, :], mask=(offs < C)[:, None],
                     other=0.0)
        q = tl.load(Q + (bk * G + rows)[:, None] * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        if F32:
            s = tl.dot(q.to(tl.float32), tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q.to(kt.dtype), tl.trans(kt))
        s = s.to(tl.bfloat16).to(tl.float32)
        qf = q.to(tl.float32)
        qn = tl.sqrt(tl.sum(qf * qf, 1))  # [GP]
        if GROUP:
            sg = tl.max(tl.where((rows < G)[:, None], s, float("-inf")), 0)
            t0 = _threshold(Thr, Work, bk, tl.max(qn, 0), margin, ch, R, NBINS)
            tl.store(S + bk.to(tl.int64) * C + offs, sg.to(tl.bfloat16), mask=offs < C)
            _append(sg, offs, bk, t0, kk, n_init, hi, C, Work, Cand, R, CAP, NBINS, ATOMIC)
        else:
            tl.store(S + (bk * G + rows)[:, None].to(tl.int64) * C + offs[None, :], s.to(tl.bfloat16),
                     mask=(rows < G)[:, None] & (offs < C)[None, :])
            for g in tl.static_range(G):
                row = bk * G + g
                t0 = _threshold(Thr, Work, row, tl.sum(tl.where(rows == g, qn, 0.0), 0), margin, ch, R, NBINS)
                sg = tl.sum(tl.where((rows == g)[:, None], s, 0.0), 0)
                _append(sg, offs, row, t0, kk, n_init, hi, C, Work, Cand, R, CAP, NBINS, ATOMIC)


def prev_scores_select_triton(q: torch.Tensor, keys: torch.Tensor, n: torch.Tensor, k: int, n_init: int,
                              n_local: int, group: bool, thr: torch.Tensor, work: torch.Tensor | None = None,
                              cand: torch.Tensor | None = None, static: bool = True, margin: int = 16,
                              cap: int = 16384, bn: int = 128, part: int = 1024, block: int = 1024,
                              num_warps: int = 4, pick_warps: int = 4, atomic: bool = True, tiles: int = 1,
                              split: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``prev_select_triton`` with the scores computed by the filter itself: q [B, Hq, 1, D], bfloat16 keys
    [B, Hkv, C, D] (contiguous) -> (the row list, the scores [B, Hs, C] bfloat16, Hs = Hkv if ``group`` (max over
    the group) else Hq). The scores equal ``q @ k^T`` rounded to bfloat16 up to the summation order; ``bn``: keys
    per block, ``tiles``: blocks per program (a loop: loads pipelined)."""
    b, hq, _, d = q.shape
    hkv, c = keys.shape[1], keys.shape[2]
    if keys.dtype != torch.bfloat16 or not keys.is_contiguous():
        raise ValueError(f"prev_scores_select_triton: keys must be contiguous bfloat16, got {keys.dtype}")
    g = hq // hkv
    hs = hkv if group else hq
    r, ns, out, work, cand = _buffers((b, hs, c), keys.device, k, n_init, n_local, thr, work, cand, None, static,
                                      cap, dict(bn=bn, part=part, block=block))
    s = torch.empty(b, hs, c, dtype=torch.bfloat16, device=keys.device)
    _score_filter_kernel[(b * hkv, triton.cdiv(max(c, 1), bn * tiles))](
        q.reshape(b * hq, d).contiguous(), keys, s, n, thr, work, cand, c, k, n_init, n_local, r, int(margin), G=g,
        GP=max(16, triton.next_power_of_2(g)), D=d, BN=bn, GROUP=group, CAP=cap, NBINS=NB, ATOMIC=atomic,
        F32=os.environ.get("TRITON_INTERPRET") == "1", TILES=tiles, num_warps=num_warps)
    return _pick(s, n, k, n_init, n_local, thr, work, cand, out, r, ns, static, cap, part, block, pick_warps,
                 split), s
