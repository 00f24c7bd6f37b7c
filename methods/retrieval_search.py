"""Exact top-k search over a host tier's keys on the CPU, for RetrievalAttention's host half
(methods/retrieval_host.py). ``topk_rows``: the set ``torch.topk`` returns, through a sampled lower bound of the
k-th score. ``half_search``: top-k over half-precision keys without a float32 copy: products in the keys' dtype
(oneDNN, rounded) bound each row's candidates, whose float32 products (the same as the float32 search's, up to
summation order) pick the top-k.
"""
from __future__ import annotations

import math

import torch


class Workspace:
    """Reused host buffers for the host half's large temporaries. A fresh tensor of tens of MB is a fresh mmap
    whose pages fault on first touch, every step (glibc returns it to the OS on free): measured 5x slower than
    writing into a kept buffer (``index_select(out=...)``)."""

    def __init__(self):
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = self.bufs[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


def scratch(ws: "Workspace | None", name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return ws.get(name, shape, dtype) if ws is not None else torch.empty(shape, dtype=dtype)

BOUND = False
"""``topk_rows`` through the sampled bound (True) or plain ``topk`` (False: measured faster on the H200 box's 16
Xeon threads at 32K, 1.9 vs 2.6 ms for 32 rows)."""
SAMPLE = 8
"""``topk_rows`` estimates each row's threshold from every SAMPLE-th score."""


def topk_rows(s: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores along the last dim of s [..., m] (in no particular order): the set
    ``s.topk(k)`` returns (ties aside). For long rows a lower bound of each row's k-th largest score is taken
    from a strided sample (the rank k/SAMPLE + 4 sd of the sample's count above it), the rows' scores at or
    above it (>= k of them, else the plain ``topk`` decides) are compacted and ``topk`` runs over those only:
    on the CPU ``topk`` of k=4,096 over 32K scores costs a selection over every (score, index) pair."""
    m = s.shape[-1]
    if not BOUND or m < max(4 * k, 16384):
        return s.topk(k, dim=-1, sorted=False).indices
    lead = s.shape[:-1]
    flat = s.reshape(-1, m)
    sample = flat[:, ::SAMPLE]
    rank = min(sample.shape[1], int(k / SAMPLE + 4 * (k / SAMPLE) ** 0.5) + 1)
    bound = sample.topk(rank, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    r = flat.shape[0]
    at = (flat >= bound).view(-1).nonzero().squeeze(1)  # flat positions, row-major: each row's candidates in turn
    row, cols = at.div(m, rounding_mode="floor"), at.remainder(m)
    counts = torch.bincount(row, minlength=r)
    if int(counts.min()) < k:
        return s.topk(k, dim=-1, sorted=False).indices
    vals = flat.view(-1).index_select(0, at)
    width = int(counts.max())
    start = counts.cumsum(0) - counts
    slot = row * width + torch.arange(at.numel()) - start[row]  # left-aligned in a [r, width] block
    cand = flat.new_full((r * width,), float("-inf")).index_copy_(0, slot, vals).view(r, width)
    where = torch.zeros(r * width, dtype=torch.long).index_copy_(0, slot, cols).view(r, width)
    return where.gather(1, cand.topk(k, dim=-1, sorted=False).indices).view(*lead, k)


def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask [R, m] with c_r set entries per row -> (cols [R, W] the set columns, left-aligned, 0 past c_r;
    valid [R, W]) with W = max c_r."""
    counts = mask.sum(-1)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major
    pos = torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[rows]
    width = int(counts.max())
    out = torch.zeros((mask.shape[0], width), dtype=torch.long)
    out[rows, pos] = cols
    valid = torch.arange(width).expand(mask.shape[0], width) < counts.unsqueeze(-1)
    return out, valid


MARGIN = 2.0**-6
"""Candidate band below the k-th rounded product, as a share of the row's largest |product|: rounding a float32
product to bfloat16 moves it by at most 2^-9 of itself (2^-11 for float16), so no row of the exact top-k falls
below the k-th rounded product minus twice that."""


def half_search(q: torch.Tensor, kbuf: torch.Tensor, lo: int, hi: int, k: int, group: bool,
                ws: Workspace | None = None):
    """q [B, Hq, D] float32 (exact in kbuf's dtype: the model's own query), kbuf [B, Hkv, cap, D] half precision ->
    (idx: rows - lo, [B, Hkv, rep, k] or [B, Hkv, k] with ``group``; sel: their float32 products [B, Hkv, rep, k]).

    One ``mm`` per KV head over rows [lo, hi) in kbuf's dtype (rounded products) gives each ranked row (a query
    head, or with ``group`` the group's maximum) its k-th rounded product t; the rows within ``MARGIN`` x max|p|
    below t are the candidates (>= k, a superset of the exact top-k); their keys are gathered and multiplied in
    float32 and ``topk`` of those picks the k."""
    b, hq, d = q.shape
    hkv, cap = kbuf.shape[1], kbuf.shape[2]
    rep, m = hq // hkv, hi - lo
    qh = q.reshape(b, hkv, rep, d)
    qk = qh.to(kbuf.dtype)
    rough = scratch(ws, "rough", (b, hkv, rep, m), torch.float32)
    for bi in range(b):  # one 2-D mm per KV head: a batched half-precision product over the strided rows takes a
        for g in range(hkv):  # slow path on the CPU (measured 15x)
            rough[bi, g] = torch.mm(qk[bi, g], kbuf[bi, g, lo:hi].T)
    rank = rough.amax(2) if group else rough  # [B, Hkv, (rep,) m]
    flat = rank.reshape(-1, m)
    kk = min(k, m)
    kth = flat.gather(1, topk_rows(flat, kk).view(flat.shape[0], kk)).amin(-1, keepdim=True)
    band = rough.abs().amax(-1).amax(-1, keepdim=True) if group else rough.abs().amax(-1)  # [B, Hkv, (rep)]
    cols, valid = compact(flat >= kth - MARGIN * band.reshape(-1, 1))
    r, w = cols.shape
    head = torch.arange(b * hkv).repeat_interleave(r // (b * hkv)).view(r, 1)  # KV head of each ranked row
    rows16 = scratch(ws, "cand16", (r * w, d), kbuf.dtype)
    torch.index_select(kbuf.view(-1, d), 0, (head * cap + lo + cols).reshape(-1), out=rows16)
    keys = scratch(ws, "cand32", (r, w, d), torch.float32)
    keys.copy_(rows16.view(r, w, d))
    if group:  # [B*Hkv, W, rep]: every head of the group; ranked by their maximum
        exact = keys @ qh.reshape(b * hkv, rep, d).transpose(-1, -2)
        score = exact.amax(-1)
    else:
        exact = (keys @ q.reshape(r, d, 1)).squeeze(-1)  # [B*Hq, W]
        score = exact
    pick = score.masked_fill(~valid, float("-inf")).topk(kk, dim=-1, sorted=False).indices  # [R, k]
    idx = cols.gather(1, pick)
    if group:
        sel = exact.gather(1, pick.unsqueeze(-1).expand(r, kk, rep)).transpose(1, 2).reshape(b, hkv, rep, kk)
        return idx.view(b, hkv, kk), sel
    return idx.view(b, hkv, rep, kk), exact.gather(1, pick).view(b, hkv, rep, kk)
