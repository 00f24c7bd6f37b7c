"""Quest's page scores: per-channel key bounds of each page and the upper bound of q.k they give, which Quest ranks
pages by (methods/quest.py, methods/quest_fast.py, methods/quest_batch.py).

``page_bounds`` / ``page_scores`` are the torch versions (any device). ``quest_scores_triton`` (CUDA; CPU tensors in
Triton's interpreter) folds the step's new key into its page's bounds in place and scores every candidate page in one
launch (reference: ``QuestDecode.pages``, torch ops). ``quest_page_list`` turns ``topk`` over the scores into Quest's
page list (the reference of ``quest_select.quest_select_triton``).
"""
from __future__ import annotations

import torch

from scbench.kernels.paged_decode import pdl_args, triton


def page_bounds(keys: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [B, H, n, D] -> per-channel (min, max) of each full page, [B, H, n // page, D] each."""
    m = keys.shape[-2] // page
    pages = keys[..., : m * page, :].unflatten(-2, (m, page))
    return pages.amin(-2), pages.amax(-2)


def page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of q.k per page: q [B, Hq, D], kmin/kmax [B, Hkv, P, D] -> [B, Hq, P] (float32).

    ``max(q*lo, q*hi)`` is ``q*hi`` where q > 0 and ``q*lo`` where q < 0, so the sum is two matmuls."""
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    q = q.float().reshape(b, hkv, hq // hkv, d)
    s = q.clamp(min=0) @ kmax.float().transpose(-1, -2) + q.clamp(max=0) @ kmin.float().transpose(-1, -2)
    return s.reshape(b, hq, -1)


if triton is not None:
    import triton.language as tl

    from scbench.kernels.paged_decode import _pdl

    @triton.jit
    def _update_bounds(K, KMin, KMax, bk, at, page_at, bbase, cols, C, D: tl.constexpr, PAGE: tl.constexpr):
        """The newest key (row ``at``) into its page's min/max bounds (the page's first key resets them)."""
        knew = tl.load(K + bk.to(tl.int64) * C * D + at * D + cols)
        lo = tl.load(KMin + bbase + page_at * D + cols)
        hi = tl.load(KMax + bbase + page_at * D + cols)
        first = (at % PAGE) == 0
        tl.store(KMin + bbase + page_at * D + cols, tl.where(first, knew, tl.minimum(lo, knew)))
        tl.store(KMax + bbase + page_at * D + cols, tl.where(first, knew, tl.maximum(hi, knew)))

    @triton.jit
    def _score_pages(qp, qn, KMin, KMax, S, bk, bbase, pages, cols, rows, cand, P, G: tl.constexpr, D: tl.constexpr,
                     GROUP: tl.constexpr, PREC: tl.constexpr):
        """The bound scores of ``pages`` for the group's query heads (``qp`` / ``qn``: their positive / negative
        parts) stored to S, non-candidates (pages >= ``cand``) -inf; GROUP: the group's maximum per page."""
        inside = pages < P
        off = bbase + pages[:, None].to(tl.int64) * D + cols[None, :]
        lo = tl.load(KMin + off, mask=inside[:, None], other=0.0)
        hi = tl.load(KMax + off, mask=inside[:, None], other=0.0)
        s = tl.dot(qp.to(hi.dtype), tl.trans(hi), input_precision=PREC)
        s += tl.dot(qn.to(lo.dtype), tl.trans(lo), input_precision=PREC)
        s = tl.where((pages < cand)[None, :], s, float("-inf"))
        if GROUP:
            s = tl.where((rows < G)[:, None], s, float("-inf"))
            tl.store(S + bk.to(tl.int64) * P + pages, tl.max(s, 0), mask=inside)
        else:
            tl.store(S + (bk * G + rows)[:, None].to(tl.int64) * P + pages[None, :], s,
                     mask=(rows < G)[:, None] & inside[None, :])

    @triton.jit
    def _quest_scores_kernel(Q, K, KMin, KMax, At, S, C, P, RECENT,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                             BP: tl.constexpr, GROUP: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = False):
        """(batch x KV head, block of BP pages): fold the new key into its page's bounds (the block holding that
        page), then the bound scores of the block's pages for the group's query heads; non-candidates -inf."""
        _pdl(PDL)
        bk, pb = tl.program_id(0), tl.program_id(1)
        at = tl.load(At).to(tl.int32)
        cols = tl.arange(0, D)
        page_at = at // PAGE
        pages = pb * BP + tl.arange(0, BP)
        bbase = bk.to(tl.int64) * P * D
        if (page_at >= pb * BP) & (page_at < pb * BP + BP):
            _update_bounds(K, KMin, KMax, bk, at, page_at, bbase, cols, C, D, PAGE)
        tl.debug_barrier()
        cand = tl.maximum(at // PAGE - RECENT + 1, 0)
        rows = tl.arange(0, GP)
        q = tl.load(Q + (bk * G + rows)[:, None] * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        zero = tl.zeros([GP, D], q.dtype)
        _score_pages(tl.maximum(q, zero), tl.minimum(q, zero), KMin, KMax, S, bk, bbase, pages, cols, rows, cand, P,
                     G, D, GROUP, PREC)

    @triton.jit
    def _quest_scores_loop_kernel(Q, K, KMin, KMax, At, S, C, P, RECENT,
                                  G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                                  BP: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr,
                                  PREC: tl.constexpr):
        """``_quest_scores_kernel`` over ITERS blocks of BP pages per program, the bounds' loads pipelined
        (``STAGES`` blocks in flight)."""
        bk, pb = tl.program_id(0), tl.program_id(1)
        at = tl.load(At).to(tl.int32)
        cols = tl.arange(0, D)
        page_at = at // PAGE
        first_page = pb * ITERS * BP
        bbase = bk.to(tl.int64) * P * D
        if (page_at >= first_page) & (page_at < first_page + ITERS * BP):
            _update_bounds(K, KMin, KMax, bk, at, page_at, bbase, cols, C, D, PAGE)
        tl.debug_barrier()
        cand = tl.maximum(at // PAGE - RECENT + 1, 0)
        rows = tl.arange(0, GP)
        q = tl.load(Q + (bk * G + rows)[:, None] * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        zero = tl.zeros([GP, D], q.dtype)
        qp, qn = tl.maximum(q, zero), tl.minimum(q, zero)
        for it in tl.range(ITERS, num_stages=STAGES):
            pages = first_page + it * BP + tl.arange(0, BP)
            _score_pages(qp, qn, KMin, KMax, S, bk, bbase, pages, cols, rows, cand, P, G, D, GROUP, PREC)


def quest_scores_triton(q: torch.Tensor, k: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, at: torch.Tensor,
                        page: int, recent: int, group: bool, block_pages: int = 64, num_warps: int = 4,
                        pdl: bool = False, loop_pages: int = 0, stages: int = 3) -> torch.Tensor:
    """CUDA: update the page bounds [B, Hkv, P, D] in place with the key at row ``at`` of k [B, Hkv, C, D] (a new
    page starts from it), then Quest's bound scores of q [B, Hq, 1, D] per page, -inf for pages that are not
    candidates (the recent pages and later) -> float32 [B, Hq, P] (``group``: [B, Hkv, P], max over the group).
    Reference: ``QuestDecode.pages`` (torch ops). ``loop_pages``: pages per program (blocks of ``block_pages``
    in a loop whose loads are pipelined ``stages`` deep) instead of one block per program."""
    b, hq, _, d = q.shape
    hkv, c, p = k.shape[1], k.shape[2], kmin.shape[2]
    g = hq // hkv
    s = torch.empty(b, hkv if group else hq, p, dtype=torch.float32, device=q.device)
    bp = block_pages
    if loop_pages:  # several blocks per program, pipelined
        iters = max(1, loop_pages // bp)
        _quest_scores_loop_kernel[(b * hkv, triton.cdiv(p, bp * iters))](
            q.reshape(b * hq, d).contiguous(), k, kmin, kmax, at, s, c, p, recent, G=g,
            GP=max(16, triton.next_power_of_2(g)), D=d, PAGE=page, BP=bp, ITERS=iters, STAGES=stages, GROUP=group,
            PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps)
        return s
    _quest_scores_kernel[(b * hkv, triton.cdiv(p, bp))](
        q.reshape(b * hq, d).contiguous(), k, kmin, kmax, at, s, c, p, recent, G=g, GP=max(16, triton.next_power_of_2(g)),
        D=d, PAGE=page, BP=bp, GROUP=group, PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps,
        **pdl_args(pdl))
    return s


def quest_page_list(top_values: torch.Tensor, top_pages: torch.Tensor, n: torch.Tensor, page: int, budget: int,
                    recent: int) -> torch.Tensor:
    """Quest's page list from ``topk`` over the page scores (non-candidates at -inf): slots past this step's pick
    count or holding a -inf score become -1, then the ``recent`` newest pages. -> [B, Hs, K + recent]."""
    r0 = ((torch.div(n - 1, page, rounding_mode="floor") - recent + 1) * page).clamp(min=0)
    cand = torch.div(r0, page, rounding_mode="floor")
    pick = torch.div(budget - (n - r0), page, rounding_mode="floor")
    rank = torch.arange(top_pages.shape[-1], device=top_pages.device)
    chosen = torch.where((top_values > float("-inf")) & (rank < pick), top_pages, -1)
    latest = (cand + torch.arange(recent, device=n.device)).expand(*chosen.shape[:2], -1)
    return torch.cat([chosen, latest], dim=-1)
