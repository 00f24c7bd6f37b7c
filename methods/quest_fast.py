"""Quest inside the captured decode step (scbench/engines/fastdecode.py plugin): bounds, top-k and paged attention
on the device, static shapes, no host synchronisation.

Per step and selecting layer: the new key updates its page's min/max bounds in place (a new page starts from the
key itself); every page's bound score is computed against a fixed-size bounds buffer, pages that are not yet
candidates (the recent pages and everything after them) are masked to -inf, and ``topk`` takes the largest
possible pick count (``(budget - 1) // page``); slots beyond this step's pick count, or holding a masked page,
are marked -1. The recent pages join the list, and ``scbench.kernels.paged_decode`` attends to the listed rows
(Triton on CUDA: no gather). On CUDA the scores come from one kernel that also updates the bounds, and
``scbench.kernels.quest_select.quest_select_triton`` lists the step's pick best pages without a sort (bisection on
the scores' bits, or an interpolating search; rows of 4,096+ pages in two stages; the old ``topk`` path stays
selectable, ``SCBENCH_QUEST_SELECT=topk``); the paged kernel merges its splits itself, or (``union``) one program
per KV group reads each page any of its heads listed once. The page set equals ``Quest.select``'s, so the plain
path (``decode_attention`` over a ``TieredLayer``) stays the reference: tests/methods/test_quest_fast.py compares
greedy tokens. Between turns nothing is copied: the static buffers become the TieredLayers' storage and the layers'
bounds are views of the plugin's (only pages past a rollback are redone).
"""
from __future__ import annotations

import os

import torch

from scbench.kernels import paged_decode
from scbench.kernels.paged_decode import paged_attention
from scbench.kernels.paged_dot import paged_dot_triton
from scbench.kernels.paged_union import paged_union_triton
from scbench.kernels.quest_scores import page_scores, quest_page_list, quest_scores_triton
from scbench.kernels.quest_select import quest_select_triton, threshold_select
from scbench.kv.offload import device_tier_unsupported


FUSED = os.environ.get("SCBENCH_QUEST_FUSED", "1") != "0"
"""CUDA: the fused Triton kernels (scores with the bounds update; attention applying the pick rule) instead of
the torch-ops page list + paged kernel (``SCBENCH_QUEST_FUSED=0``; tests compare the two)."""
SELECT = os.environ.get("SCBENCH_QUEST_SELECT", "bisect")
"""CUDA page top-k: ``bisect`` (scbench/kernels/quest_select.py: no sort, pages listed in ascending order) or
``topk`` (torch.topk, sorted; the kernel applies the pick rule). Kept for comparison (scripts/bench_quest_decode.py)."""
SEARCH = os.environ.get("SCBENCH_QUEST_SEARCH", "")
"""How ``quest_select_triton`` finds the threshold (the same pages each way): ``bisect`` (32 counts), ``radix`` (4
histogram passes) or ``search`` (interpolating search, ~5-15 counts); default: ``search`` for two-stage rows (H200,
131K: 2.07 vs 2.27 ms per 32-layer step), ``bisect`` for shorter ones (32K: 1.31 vs 1.33 ms; radix: 1.66 / 3.59)."""
SEARCHES = {"bisect": 0, "radix": 1, "search": 2}
SEGMENT = int(os.environ.get("SCBENCH_QUEST_SEGMENT", "1024"))
"""CUDA: rows of 4,096 pages or more (64K+ tokens) select in two stages, each segment of this many pages keeping its
best first (0: one program per row); H200, 131K: 2.36 vs 2.57 ms per 32-layer step (results/perf/quest_step_h200.md)."""
MERGE = os.environ.get("SCBENCH_QUEST_MERGE", "1") == "1"
"""CUDA: the attention kernel's last split of a head (group) merges the splits (no combine kernel); H200: 1.34 vs
1.38 ms (32K), 2.48 vs 2.57 ms (131K) per 32-layer step."""
UNION = os.environ.get("SCBENCH_QUEST_UNION", "0") == "1"
"""CUDA, gqa=head: the select kernel also writes each head's page map and one program per KV head and page range
attends the group's heads over the union of their pages (each page read once; the same selection and math). Off:
on random weights the heads' pages barely overlap (1.41 vs 2.01 GB at 32K) and the kernel reaches 1.33 TB/s
against the paged kernel's 2.41 (H200, 32K: 1.55 vs 1.31 ms per step); for models whose heads agree."""
DOT = os.environ.get("SCBENCH_QUEST_DOT", "1") == "1"
"""CUDA: the paged attention as two small matmuls per block with a pipelined loop (``paged_dot.paged_dot_triton``)
instead of elementwise products (H200, 131K: 1.85 vs 2.02 ms per 32-layer step; results/perf/quest_step_h200.md)."""
THRESHOLD = os.environ.get("SCBENCH_QUEST_THRESHOLD", "0") == "1"
"""CUDA: the page select in one launch per layer (``kernels/quest_select.threshold_select``: a threshold from the
row's mean and deviation, then an exact search over the pages above it; the same pages)."""
PDL = os.environ.get("SCBENCH_QUEST_PDL", "0") == "1"
"""CUDA (Hopper+): Quest's kernels launched as programmatic dependents (each waits for the previous kernel's writes,
then lets the next launch: the launch gaps between a layer's kernels overlap)."""
ADOPT = os.environ.get("SCBENCH_QUEST_ADOPT", "1") != "0"
"""After a turn the static buffers become the TieredLayers' storage (no per-turn copy of the cache);
``SCBENCH_QUEST_ADOPT=0``: the rows are appended to the layers' own buffers and copied back each turn."""


LONG_SCORES = {"loop_pages": 512, "stages": 3}
"""``quest_scores_triton``'s sizes for rows of 4,096+ pages (results/perf/quest_step_h200.md, round 8)."""


class QuestDecode:
    """fastdecode plugin for a ``Quest`` method instance."""

    adopt_layers = ADOPT
    """The decode buffers become each TieredLayer's storage when they are made (``StaticKV``), not at the first
    ``store_back``: the first decode does not hold the cache twice (at 131K on the 8B shape: 51.3 GiB peak on an H100
    against full attention's 37.8)."""

    def __init__(self, method):
        self.m = method
        self.kmin: dict[int, torch.Tensor] = {}
        self.kmax: dict[int, torch.Tensor] = {}
        self.q_heads = 0
        self._n = None
        self.select = SELECT
        self.tune: dict = {}  # paged_attention_triton's split / block / warp sizes (None: its defaults)
        self.score_args: dict = {}  # quest_scores_triton's block_pages / num_warps
        self.select_args: dict = {"radix": SEARCHES[SEARCH]} if SEARCH else {}  # quest_select_triton's radix /
        # segment / warps (more than these defaults)
        self.merge = MERGE  # CUDA: the paged / union kernel merges its splits itself (one launch less per layer)
        self.segment, self.segment_from = SEGMENT, 4096  # rows of >= segment_from pages: two-stage select
        self.union = UNION  # CUDA, gqa=head: page maps + the union kernel (kernels/paged_union.py)
        self.union_args: dict = {}  # its range_pages / block_pages / num_warps
        self.dot = DOT  # CUDA, one list per query head: the matmul paged kernel (kernels/paged_dot.py)
        self.threshold = THRESHOLD  # CUDA: the one-launch threshold select (kernels/quest_select.py)
        self.threshold_args: dict = {}  # its cap / chunk / num_warps
        self.pdl = PDL
        self.counter: torch.Tensor | None = None
        self._read_key, self._read = None, 0

    def unsupported(self, cache) -> str | None:
        return device_tier_unsupported(cache, "quest", "the plain loop loads it")

    def allocate(self, kv, cache) -> None:
        p = self.m.page_size
        self.counter = kv.k[0].new_zeros(kv.k[0].shape[0] * 1024, dtype=torch.int32)  # the merge's (left at 0)
        for l, kb in enumerate(kv.k):
            if l >= self.m.dense_layers:
                b, h, c, d = kb.shape
                self.kmin[l] = kb.new_zeros(b, h, c // p, d)
                self.kmax[l] = kb.new_zeros(b, h, c // p, d)

    def load(self, kv, cache) -> None:
        """Bounds of every page held (the last one possibly partial). Full pages are not recomputed from all keys:
        they come from the layer's own bounds (``Quest.bounds``: made at the prefill, extended by new pages,
        copied), or are still in these buffers from the last turn (the layer's state views them): then only pages
        past the layer's crop floor are redone, from the keys just loaded. Without a cache: every page."""
        p = self.m.page_size
        for l, n in enumerate(kv.lengths):
            if l not in self.kmin:
                continue
            full = n // p
            layer = cache.layers[l] if cache is not None else None
            valid = self._own_pages(layer, l, full)
            if valid is None and layer is not None:
                lo, hi = self.m.bounds(layer)
                self.kmin[l][:, :, :full].copy_(lo[:, :, :full])
                self.kmax[l][:, :, :full].copy_(hi[:, :, :full])
                valid = full
            keys = kv.k[l][:, :, :n]
            if full > (valid or 0):
                v0 = valid or 0
                lo, hi = keys[:, :, v0 * p : full * p].unflatten(-2, (full - v0, p)).aminmax(dim=-2)
                self.kmin[l][:, :, v0:full], self.kmax[l][:, :, v0:full] = lo, hi
            if n % p:
                lo, hi = keys[:, :, full * p :].aminmax(dim=-2)
                self.kmin[l][:, :, full].copy_(lo)
                self.kmax[l][:, :, full].copy_(hi)
            if layer is not None:
                self._share(layer, l)

    def _own_pages(self, layer, l: int, full: int) -> int | None:
        """Full pages of these buffers still valid for ``layer`` (its state views them and it was not cropped
        below them), or None when its bounds are not views of these buffers."""
        st = None if layer is None else layer.state.get("quest")
        if st is None or st[0].data_ptr() != self.kmin[l].data_ptr() or st[1].data_ptr() != self.kmax[l].data_ptr():
            return None
        return min(st[0].shape[2], layer.crop_floor // self.m.page_size, full)

    def _share(self, layer, l: int) -> None:
        """The layer's bounds become views of this plugin's full pages (the same values ``Quest.bounds`` computes:
        min / max are exact), so the next turn redoes no page and the plain path can take over."""
        full = layer.n // self.m.page_size
        layer.state["quest"] = (self.kmin[l][:, :, :full], self.kmax[l][:, :, :full])
        layer.crop_floor = layer.n

    def pages(self, kv, l: int, q: torch.Tensor) -> torch.Tensor:
        """Update layer l's bounds with the new key; the page list [B, Hs, K + recent_pages] of this step."""
        m, p = self.m, self.m.page_size
        kmin, kmax = self.kmin[l], self.kmax[l]
        at = kv.at[l : l + 1]
        page = torch.div(at, p, rounding_mode="floor")
        new = kv.k[l].index_select(2, at)  # [B, H, 1, D]
        first = (at % p == 0).view(1, 1, 1, 1)
        kmin.index_copy_(2, page, torch.where(first, new, torch.minimum(kmin.index_select(2, page), new)))
        kmax.index_copy_(2, page, torch.where(first, new, torch.maximum(kmax.index_select(2, page), new)))
        n = at + 1
        cand = torch.div(((torch.div(n - 1, p, rounding_mode="floor") - m.recent_pages + 1) * p).clamp(min=0), p,
                         rounding_mode="floor")
        b, hkv, total, _ = kmin.shape
        s = page_scores(q[:, :, 0], kmin, kmax)  # [B, Hq, P]
        if m.gqa == "group":
            s = s.reshape(b, hkv, -1, total).amax(2)
        s = s.masked_fill(torch.arange(total, device=q.device) >= cand, float("-inf"))
        top = s.topk(self.top_k(total), dim=-1)
        return quest_page_list(top.values, top.indices, n, p, m.budget, m.recent_pages)

    def top_k(self, pages: int) -> int:
        """Pages ``topk`` takes each step: the most a step can pick, ``(budget - 1) // page``."""
        return min(pages, (self.m.budget - 1) // self.m.page_size)

    def attend(self, kv, l, q, k, v, scale):
        self.q_heads = q.shape[1]
        if l < self.m.dense_layers:
            return None
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if self._n is None or l == self.m.dense_layers:  # every layer's valid length, once per step
            self._n = kv.at + 1
        if q.is_cuda and paged_decode.triton is not None and FUSED:
            return self.attend_triton(kv, l, q, k, v, scale)
        at = kv.at[l : l + 1]
        return paged_attention(q, k, v, self.pages(kv, l, q), at + 1, self.m.page_size, scale)

    def attend_triton(self, kv, l, q, k, v, scale):
        """The Triton kernels (CUDA; CPU tensors in the interpreter): bounds + scores in one kernel, the page select,
        then the paged (or union) attention."""
        m, at, n = self.m, kv.at[l : l + 1], self._n[l : l + 1]
        pdl = {"pdl": True} if self.pdl else {}
        score_args = self.score_args
        if not score_args and self.kmin[l].shape[2] >= self.segment_from:  # long rows: 512 pages per program,
            score_args = LONG_SCORES  # pipelined (H200, 131K: 0.35 vs 0.40 ms per step; 32K: slower, too few programs)
        s = quest_scores_triton(q, kv.k[l], self.kmin[l], self.kmax[l], at, m.page_size,
                                             m.recent_pages, m.gqa == "group", **score_args, **pdl)
        sel = dict(self.select_args)
        if self.segment and s.shape[-1] >= self.segment_from:  # long rows: two stages (the same pages)
            sel.setdefault("segment", self.segment)
            sel.setdefault("local_warps", 1)
            sel.setdefault("radix", 2)
        if self.select == "bisect" and self.union and m.gqa == "head":  # each page of a group's union read once
            mp = torch.empty(s.shape, dtype=torch.int8, device=s.device)
            quest_select_triton(s, n, m.page_size, m.budget, m.recent_pages, self.top_k(s.shape[-1]), map_out=mp,
                                **sel)
            return paged_union_triton(q, k, v, mp, n, m.page_size, scale, counter=self.counter if self.merge else None,
                                      **self.union_args)
        if self.select == "bisect":
            if self.threshold:
                pages = threshold_select(s, n, m.page_size, m.budget, m.recent_pages, self.top_k(s.shape[-1]),
                                         **self.threshold_args, **pdl)
            else:
                pages = quest_select_triton(s, n, m.page_size, m.budget, m.recent_pages, self.top_k(s.shape[-1]), **sel)
            attend = paged_dot_triton if self.dot and pages.shape[1] == q.shape[1] else paged_decode.paged_attention_triton
            return attend(q, k, v, pages, n, m.page_size, scale, counter=self.counter if self.merge else None,
                          **self.tune, **pdl)
        top = s.topk(self.top_k(s.shape[-1]), dim=-1)
        return paged_decode.paged_attention_triton(q, k, v, top.indices, at + 1, m.page_size, scale,
                                                   top_values=top.values, budget=m.budget, recent=m.recent_pages)

    def rows_loaded(self, n: int) -> int | None:
        """Rows one selecting head attends at length n (None: every row, as ``Quest.select`` returning None)."""
        m, p = self.m, self.m.page_size
        r0 = max(0, ((n - 1) // p - m.recent_pages + 1) * p)
        pick = (m.budget - (n - r0)) // p
        return None if pick >= r0 // p else pick * p + n - r0

    def store_back(self, kv, cache, fed: int) -> bool:
        """Give each TieredLayer its rows back (the static buffers become its storage: no copy, and the next turn's
        load copies nothing; else the fed tokens are appended), its bounds as views of this plugin's, and count
        the bytes the steps read, as the plain path counts."""
        for l, (layer, kb, vb, n) in enumerate(zip(cache.layers, kv.k, kv.v, kv.lengths)):
            if not (ADOPT and layer.adopt(kb, vb, n + fed)) and fed:
                layer._append(kb[:, :, n : n + fed], vb[:, :, n : n + fed])
            if l >= self.m.dense_layers:
                self._share(layer, l)  # the layer's own bounds follow, as after plain steps (resident bytes agree)
            b, hkv, _, d = kb.shape
            hs = hkv if self.m.gqa == "group" else self.q_heads
            row = b * d * kb.element_size() * 2  # keys + values
            layer.loaded_bytes += row * self._rows_read(n, fed, l < self.m.dense_layers, hkv, hs)
        return True

    def _rows_read(self, n: int, fed: int, dense: bool, hkv: int, hs: int) -> int:
        """Key rows one layer's ``fed`` steps read after n stored rows, over its heads (layers of equal length
        share the sum: computed once per turn, not per layer)."""
        key = (n, fed, dense, hkv, hs)
        if self._read_key != key:
            total = 0
            for i in range(1, fed + 1):
                rows = None if dense else self.rows_loaded(n + i)
                total += hkv * (n + i) if rows is None else hs * rows
            self._read_key, self._read = key, total
        return self._read
