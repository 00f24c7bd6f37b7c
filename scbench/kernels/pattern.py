"""Sparse prefill patterns: which cells of the causal score matrix a prefill computes.

A pattern is a union of three line families on the bottom-right-aligned causal score matrix of a chunk
(``Tq`` queries that are the last ``Tq`` of ``Tk`` keys; query row ``i`` sits at position ``p = i + Tk - Tq``):

- key columns ``j`` with ``cols[j]`` (vertical lines: attention sinks, heavy keys),
- diagonals ``d = p - j`` with ``diags[d]`` (slash lines: the local window is ``d < n_local``),
- the last ``n_last`` query rows, dense (Tri-shape).

Cell ``(i, j)`` is computed iff ``j <= p`` and one of the three holds. A-shape, Tri-shape and the
vertical-slash pattern are all of this form. This module holds the plain reference (dense scores with an
explicit boolean mask), a chunked CPU path that only touches the keys a query chunk can see, and the exact
count of computed cells (the attention density). The GPU path is in ``scbench.kernels.flex``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from scbench.kernels.dense import DECODE_BACKENDS, causal_attention


@dataclass
class Pattern:
    """One chunk's pattern. ``P`` is 1 (shared by every head) or the number of query heads."""

    tq: int
    tk: int
    cols: torch.Tensor
    """bool [P, Tk]: key columns every later query attends to."""
    diags: torch.Tensor
    """bool [P, Tk]: diagonals d = p - j attended to (index 0 is the main diagonal)."""
    n_last: int = 0
    """The last n_last query rows attend densely (causally) to every key."""
    scattered_cols: bool = False
    """Hint for the GPU path: the columns are spread out, gather them instead of masking key blocks."""
    band: tuple[int, int] | None = None
    """(n_init, n_local) when cols are the first n_init keys and diags the first n_local (set by ``band``):
    lets the GPU path test cells arithmetically instead of reading the tables."""
    no_cols: bool = False
    """``cols`` is all False (set by ``diagonals_only``): the GPU path's cell test skips the column table."""

    def __post_init__(self) -> None:
        if self.tk < self.tq or self.tq < 1:
            raise ValueError(f"need 1 <= Tq <= Tk, got Tq={self.tq}, Tk={self.tk}")
        for name in ("cols", "diags"):
            t = getattr(self, name)
            if t.dtype != torch.bool or t.dim() != 2 or t.shape[-1] != self.tk:
                raise ValueError(f"Pattern.{name} must be bool [P, Tk={self.tk}], got {t.dtype} {tuple(t.shape)}")
        if self.cols.shape[0] != self.diags.shape[0]:
            raise ValueError("Pattern.cols and Pattern.diags must have the same number of heads")

    @property
    def heads(self) -> int:
        return self.cols.shape[0]

    @property
    def offset(self) -> int:
        """Position of query row 0 (bottom-right alignment)."""
        return self.tk - self.tq

    @property
    def row0(self) -> int:
        """First dense query row."""
        return max(self.tq - self.n_last, 0)

    def prefix(self, name: str) -> torch.Tensor:
        """int32 [P, Tk + 1]: chosen lines below each index, of ``cols`` or ``diags``; computed once per pattern
        (the GPU path's block lists of both FlexAttention calls read it). Change a pattern's lines in place only
        before this is first called."""
        lines = getattr(self, name)
        memo = self.__dict__.setdefault("_prefix", {})
        if name not in memo or memo[name][0] is not lines:
            memo[name] = (lines, F.pad(lines.cumsum(-1, dtype=torch.int32), (1, 0)))
        return memo[name][1]

    def diagonals_only(self) -> "Pattern":
        """This pattern without its columns (the block-sparse part when the GPU path gathers the columns
        apart); it shares this pattern's diagonal prefix sums."""
        main = dataclasses.replace(self, cols=torch.zeros_like(self.cols), scattered_cols=False, no_cols=True)
        no_cols = torch.zeros(main.heads, self.tk + 1, dtype=torch.int32, device=main.cols.device)
        main.__dict__["_prefix"] = {"diags": (self.diags, self.prefix("diags")), "cols": (main.cols, no_cols)}
        return main

    def mask(self, rows: slice | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
        """bool [P, rows, keys] (default: every row and key)."""
        dev = self.cols.device
        i = torch.arange(self.tq, device=dev)[rows if rows is not None else slice(None)]
        j = keys if keys is not None else torch.arange(self.tk, device=dev)
        d = (i[:, None] + self.offset) - j[None, :]
        causal = d >= 0
        m = self.cols[:, j][:, None, :] | self.diags[:, d.clamp(min=0)] | (i >= self.row0)[None, :, None]
        return m & causal

    def computed_cells(self) -> int:
        """Exact number of computed cells, summed over the P pattern heads (no mask materialised)."""
        tq, tk, off, r0 = self.tq, self.tk, self.offset, self.row0
        n_dense = tq - r0
        dense = n_dense * off + (tq * (tq + 1) - r0 * (r0 + 1)) // 2
        total = dense * self.heads
        if r0 == 0:
            return int(total)
        p0, p1 = off, off + r0 - 1  # positions of the patterned rows
        idx = torch.arange(tk, device=self.cols.device)
        span = (p1 - idx.clamp(min=p0) + 1).clamp(min=0)  # rows that see column j, or diagonal d
        cols, diags = self.cols.long(), self.diags.long()
        cum = F.pad(diags.cumsum(-1), (1, 0))  # cum[:, x] = selected diagonals below x
        lo = (p0 - idx).clamp(0, tk).expand_as(cum[:, 1:])
        hi = (p1 - idx + 1).clamp(0, tk).expand_as(cum[:, 1:])
        overlap = cols * (cum.gather(-1, hi) - cum.gather(-1, lo))  # column cells also on a chosen diagonal
        total += int((cols * span).sum() + (diags * span).sum() - overlap.sum())
        return int(total)


def causal_cells(tq: int, tk: int) -> int:
    """Cells of the bottom-right-aligned causal score matrix of one head."""
    return tq * (tk - tq) + tq * (tq + 1) // 2


def band(tq: int, tk: int, n_init: int, n_local: int, n_last: int = 0, device=None) -> Pattern:
    """A-shape (n_last=0) or Tri-shape: the first n_init columns and the n_local nearest diagonals."""
    cols = torch.zeros(1, tk, dtype=torch.bool, device=device)
    diags = torch.zeros(1, tk, dtype=torch.bool, device=device)
    cols[:, :n_init] = True
    diags[:, :n_local] = True
    return Pattern(tq, tk, cols, diags, n_last=n_last, band=(n_init, n_local))


def _expand(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, heads, T, D] (GQA)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def reference_attention(q, k, v, pattern: Pattern, scale: float | None = None) -> torch.Tensor:
    """Plain float64 softmax(QK^T + mask)V with the pattern's explicit mask; the yardstick of every path.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] -> [B, Hq, Tq, D] in q's dtype.
    """
    hq, d = q.shape[1], q.shape[-1]
    scores = (q.double() @ _expand(k, hq).double().transpose(-1, -2)) * (scale if scale is not None else d**-0.5)
    scores = scores.masked_fill(~pattern.mask(), float("-inf"))
    return (scores.softmax(-1) @ _expand(v, hq).double()).to(q.dtype)


def chunked_attention(q, k, v, pattern: Pattern, scale: float | None = None, budget: int | None = None,
                      fast: bool | None = None) -> torch.Tensor:
    """The reference, memory-light: query chunks, each against only the keys it can see (SDPA, input dtype).

    Memory is O(chunk x visible keys x Hq) score cells (about ``budget``), so A-shape costs O(Tq x window).
    ``budget`` defaults to 2^24 cells, and to 2^28 in the fast form on CUDA, whose memory-efficient kernel keeps no
    score matrix (a cell is the mask's byte and its additive bf16 copy, as in ``dense.prefix_rows_attention``): at
    131K keys vertical-slash's visible keys are nearly all of them, so 2^24 cut a 50-row query into 4 chunks of 16
    rows, each a masked call over every key (30.3 ms per layer on the H200, ``results/perf/query_chunk_h200.md``);
    with 2^28 one chunk takes about 60 rows (not yet measured on a GPU).
    ``fast`` (default: on CUDA, where the GPU path sends chunks of fewer than 128 rows: a first turn's query fed
    after its context with ``policy.query_visible=false``, later turns under ``sparse_prefill=every``): the dense
    last rows (Tri-shape) are one dense causal call (``dense.causal_attention``: flash with GQA on CUDA), and the
    query heads that share a KV head attend as one head of g x rows with their mask rows regrouped, so SDPA never
    expands the keys and values to every query head (its masked ``enable_gqa`` form copies them for every chunk).
    On the H200 at 131K the multi-turn first turn, whose query comes here, took 1.2-1.4 s longer than multi-request's,
    whose query is fed dense (Tri-shape, vertical-slash); on a CPU the fast form is 2-5x faster
    (``scripts/probe_query_chunk.py``). Off (the CPU default, so CPU results stay as they were): per query head.
    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] -> [B, Hq, Tq, D].
    """
    tq, off = pattern.tq, pattern.offset
    hq, hk = q.shape[1], k.shape[1]
    gqa = hq != hk
    fast = q.is_cuda if fast is None else fast
    group = fast and gqa
    if budget is None:
        budget = 1 << 28 if fast and q.is_cuda else 1 << 24
    if group and pattern.heads not in (1, hq):
        raise ValueError(f"a pattern over {pattern.heads} heads for {hq} query heads: expected 1 or {hq}")
    out = torch.empty_like(q)
    if fast and pattern.row0 < tq:  # the dense rows: causal over every key, aligned to the end of the keys
        out[:, :, pattern.row0 :] = causal_attention(q[:, :, pattern.row0 :], k, v, scale)
        tq = pattern.row0
    any_col = pattern.cols.any(0)
    sel = pattern.diags.any(0).nonzero()
    dmax = int(sel[-1]) if len(sel) else 0
    i0 = 0
    while i0 < tq:
        dense_rows = False
        chunk = max(16, budget // (hq * (min(dmax, pattern.tk) + int(any_col.sum()) + 1)))
        i1 = min(tq, i0 + chunk)
        if i1 > pattern.row0:  # dense rows need every key: cut the chunk at row0 or make it small
            if i0 < pattern.row0:
                i1 = pattern.row0
            else:
                dense_rows = True
                i1 = min(tq, i0 + max(16, budget // (hq * pattern.tk)))
        p0, p1 = i0 + off, i1 - 1 + off
        need = torch.zeros(p1 + 1, dtype=torch.bool, device=q.device)
        if dense_rows:
            need[:] = True
        else:
            need[max(0, p0 - dmax):] = True
            need |= any_col[: p1 + 1]
        keys = need.nonzero().squeeze(1)
        contiguous = len(keys) == int(keys[-1] - keys[0]) + 1
        ks = slice(int(keys[0]), int(keys[-1]) + 1) if contiguous else keys
        kk, vv = (k[:, :, ks], v[:, :, ks]) if contiguous else (k.index_select(2, keys), v.index_select(2, keys))
        m = pattern.mask(slice(i0, i1), keys)
        if group:  # query head h * g + e reads KV head h: row (e, i) of KV head h's g x rows
            b, r, d, nk = q.shape[0], i1 - i0, q.shape[-1], len(keys)
            g = hq // hk
            qg = q[:, :, i0:i1].reshape(b, hk, g * r, d)
            mg = m.expand(g, r, nk).reshape(1, g * r, nk) if m.shape[0] == 1 else m.reshape(hk, g * r, nk)
            # CUDA: not cuDNN, which plans per new (Tq, Tk), i.e. per turn (kernels.dense.DECODE_BACKENDS)
            with sdpa_kernel(DECODE_BACKENDS) if q.is_cuda else contextlib.nullcontext():
                o = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mg, scale=scale)
            out[:, :, i0:i1] = o.reshape(b, hq, r, d)
        else:
            out[:, :, i0:i1] = F.scaled_dot_product_attention(
                q[:, :, i0:i1], kk, vv, attn_mask=m, scale=scale, enable_gqa=gqa
            )
        i0 = i1
    return out
