"""RetrievalAttention's device tier inside the captured decode step (scbench/engines/fastdecode.py plugin).

Per step and layer: the inner products of the query with every key of the static buffer (one matmul), rows
outside the searchable range [n_init, n - n_local) masked to -inf, ``topk`` of ``top_k``, then the static rows
(the first ``n_init`` and the last ``n_local``) join the list and ``scbench.kernels.paged_decode`` attends to the
listed rows in place (pages of one row; Triton on CUDA). On CUDA a radix select (``scbench.kernels.topk_select``)
lists the top rows without a sort, the static rows included (the default). Opt-in (``SCBENCH_RETRIEVAL_SELECT=prev``,
bfloat16 scores), ``scbench.kernels.prev_select`` finds the same rows from a threshold carried over from the previous
step (per layer and row, kept on the device: the CUDA graph updates it) with a whole-row fallback on the device
(``scbench.kernels.prev_scores``: the same with the scores computed by its filter); end to end at 131K it decoded
40.2 tok/s against the radix select's 98.2 (a real model's queries move past the carried threshold). Slots holding a masked row, or a
static row that another slot already covers (short contexts), are -1. The row set equals
``RetrievalAttention.select``'s, so the plain loop stays the reference: tests/methods/test_retrieval_fast.py compares
greedy tokens. Exact search only (``index`` exact, ``tier`` device); the host tier and faiss indices take the plain
loop.
"""
from __future__ import annotations

import os

import torch

from scbench.kernels import prev_scores, prev_select, row_select, sample_select, topk_select
from scbench.kernels.paged_decode import paged_attention
from scbench.kv.offload import device_tier_unsupported

SELECT = os.environ.get("SCBENCH_RETRIEVAL_SELECT", "radix")
"""CUDA top-k over the rows: ``radix``, the default (scbench/kernels/topk_select.py: histogram passes, three
launches), ``prev`` (opt-in, scbench/kernels/prev_select.py: each layer and row's threshold carried over from the
previous step, a filter launch and a pick among a few thousand candidates; bfloat16 scores, else radix; on the H200
at 131K the 32-layer attention step with the same query every step takes 4.33 ms against radix's 5.39, full
attention 4.15, but end to end through `scbench run` at 131K it decoded 40.2 tok/s against radix's ~98: a real
model's queries move the k-th score past the carried threshold and rows fall back to the whole-row select;
results/perf/ra_h29r.md), ``sample`` (scbench/kernels/sample_select.py: a sampled threshold narrows each row to
a few thousand candidates, then an exact select among them; two launches) or ``topk`` (torch.topk over the masked float32 scores, the plain ops)."""


ADOPT = os.environ.get("SCBENCH_RETRIEVAL_ADOPT", "1") != "0"
"""The decode buffers become the TieredLayers' storage (when made, and after each turn); ``SCBENCH_RETRIEVAL_ADOPT=0``:
the layers keep their own rows, the fed tokens appended to them, and the buffers are a second copy beside them."""


class RetrievalDecode:
    """fastdecode plugin for a ``RetrievalAttention`` method instance."""

    adopt_layers = ADOPT
    """The decode buffers become each TieredLayer's storage when they are made (``StaticKV``) and after each turn
    (``store_back``): the layers do not keep a second copy of the cache beside them (at 131K on the 8B shape: 49.5 GiB
    peak on an H100 against full attention's 37.8)."""

    def __init__(self, method):
        self.m = method
        self.q_heads = 0
        self._n = None
        self.select = SELECT
        self.tune: dict = {"pages_per_split": 256, "block_pages": 64}  # paged_attention_triton's sizes (rows)
        self.radix: dict = {}  # radix_select_triton's chunk / digits / num_warps (None: its defaults)
        self.fused = False  # CUDA: scores + first radix pass in one Triton kernel (measured slower than a matmul
        # and a separate pass on the H200: 8.1 vs 5.5 ms per 32-layer step at 128K, scripts/bench_quest_decode.py;
        # a chunked version with the histograms summed per program: 12.3 ms, scripts/bench_ra_device.py)
        self.score_args: dict = {}  # retrieval_scores_triton's block / num_warps
        self.merge = False  # CUDA: the paged kernel merges its splits itself (one launch less per layer)
        self.counter: torch.Tensor | None = None
        self.step_work = True  # CUDA radix: every layer's histograms in one buffer zeroed once per step (one memset
        # per step instead of one per layer; 0.03 ms per step at 128K: within noise)
        self.work: torch.Tensor | None = None  # [layers, work_size] int32
        self.sample: dict = {}  # sample_select_triton's chunk / samples / block / margin / warps (select=sample)
        self.cand: torch.Tensor | None = None  # its candidate scratch (shared by the layers: they run in order)
        self.prev: dict = {}  # prev_select_triton's margin / cap / chunk / part / warps (select=prev)
        self.thr: torch.Tensor | None = None  # its thresholds [layers, rows] int32, kept across steps
        self.prev_fused = False  # select=prev: the filter kernel computes the scores too (no matmul)
        self.one_launch = False  # CUDA, bfloat16 scores: the radix select in one launch (scbench/kernels/row_select.py;
        # correct but slower on the H200: 6.16 vs 5.37 ms per 32-layer step at 128K, results/perf/ra_h27r.md)

    def allocate(self, kv, cache) -> None:
        self.counter = kv.k[0].new_zeros(kv.k[0].shape[0] * 1024, dtype=torch.int32)  # the merge's (left at 0)

    def unsupported(self, cache) -> str | None:
        return device_tier_unsupported(cache, "retrieval", "the plain loop searches it there")

    def rows(self, kv, l: int, q: torch.Tensor, n: torch.Tensor | None = None, step: bool = False) -> torch.Tensor:
        """The row list [B, Hs, top_k + n_init + n_local] of this step (-1: unused slot); n: the valid length.
        ``step``: called by ``attend`` (layer l's radix work is then a row of the buffer it zeroes at layer 0)."""
        m = self.m
        k = kv.k[l]
        b, hkv, c, d = k.shape
        hq = q.shape[1]
        n = kv.at[l : l + 1] + 1 if n is None else n
        lo, hi = m.n_init, n - m.n_local
        if k.is_cuda and topk_select.triton is not None and self.select in ("radix", "sample", "prev"):
            work = self._layer_work(kv, l, k, q) if step and self.step_work else None
            return self._rows_radix(q, k, n, lo, hi, work, (l, len(kv.k)))
        s = q.reshape(b, hkv, hq // hkv, d).to(k.dtype) @ k.transpose(-1, -2)  # [B, Hkv, rep, C]
        s = s.amax(2) if m.gqa == "group" else s.reshape(b, hq, c)
        pos = torch.arange(c, device=q.device)
        s = s.float().masked_fill((pos < lo) | (pos >= hi), float("-inf"))
        top = s.topk(min(m.top_k, c), dim=-1)
        found = torch.where(top.values > float("-inf"), top.indices, -1)
        return torch.cat([self._static(n, lo, hi).expand(*found.shape[:2], -1), found], dim=-1)

    def _static(self, n, lo: int, hi) -> torch.Tensor:
        """The first n_init and last n_local rows [n_init + n_local] (-1: not valid yet, or listed already)."""
        init = torch.arange(lo, device=n.device)
        init = torch.where(init < n, init, -1)
        local = hi + torch.arange(self.m.n_local, device=n.device)
        local = torch.where(local >= lo, local, -1)  # short contexts: rows below n_init are already listed
        return torch.cat([init, local])

    def _layer_work(self, kv, l: int, k: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Layer l's zeroed radix work buffer: a row of ``self.work``, which ``attend`` zeroes at layer 0."""
        rows = k.shape[0] * (k.shape[1] if self.m.gqa == "group" else q.shape[1])
        size = max(topk_select.work_size(rows, k.dtype, self.radix.get("digits")), row_select.work_size(rows),
                   prev_select.work_size(rows))
        if self.work is None or self.work.shape != (len(kv.k), size) or self.work.device != k.device:
            self.work = torch.zeros(len(kv.k), size, dtype=torch.int32, device=k.device)
        return self.work[l]

    def _rows_radix(self, q, k, n, lo: int, hi, work: torch.Tensor | None = None, layer=(0, 1)) -> torch.Tensor:
        """The same row list (int32, found rows unordered) on CUDA: scores and the first radix pass in one kernel
        (``fused``; else a matmul), then the sort-free radix select. ``work``: a zeroed radix work buffer."""
        m = self.m
        b, hkv, c, d = k.shape
        group = m.gqa == "group"
        kk, ns = min(m.top_k, c), lo + m.n_local
        first = None if work is None else 0
        if self.select == "prev" and self.prev_fused and k.dtype == torch.bfloat16 and k.is_contiguous():
            return self._rows_prev(None, n, kk, lo, work, *layer, q=q, k=k).view(b, -1, ns + kk)
        if self.fused:
            s, work = topk_select.retrieval_scores_triton(q, k, n, kk, lo, m.n_local, group,
                                                          digits=self.radix.get("digits"), **self.score_args)
            first = 1
        else:
            s = q.reshape(b, hkv, -1, d).to(k.dtype) @ k.transpose(-1, -2)
            s = s.amax(2) if group else s.flatten(1, 2)
            if self.select == "prev" and s.dtype == torch.bfloat16:
                return self._rows_prev(s, n, kk, lo, work, *layer, q=q).view(b, s.shape[1], ns + kk)
            if self.select == "sample":
                return self._rows_sample(s, n, kk, lo, work).view(b, s.shape[1], ns + kk)
            if self.one_launch and row_select.one_launch_ok(s) and self.radix.get("digits") in (None, (8, 8)):
                if work is None:
                    work = torch.zeros(row_select.work_size(s.shape[0] * s.shape[1]), dtype=torch.int32,
                                       device=s.device)
                rows = row_select.radix_select_one(s, n, kk, lo, m.n_local, work, chunk=self.radix.get("chunk", 2048))
                return rows.view(b, s.shape[1], ns + kk)
        rows = topk_select.radix_select_triton(s, n, kk, lo, m.n_local, work=work, static=True, first=first,
                                               **self.radix)
        return rows.view(b, s.shape[1], ns + kk)

    def _rows_sample(self, s, n, kk: int, lo: int, work: torch.Tensor | None) -> torch.Tensor:
        """sample_select_triton's row list; ``work``: zeroed int32 (its per-row counters), else zeroed here."""
        r = s.shape[0] * s.shape[1]
        cap = self.sample.get("cap") or sample_select.cap_for(kk)
        if self.cand is None or self.cand.numel() < r * cap or self.cand.device != s.device:
            self.cand = torch.empty(r * cap, dtype=torch.int32, device=s.device)
        cnt = work[: sample_select.work_size(r)] if work is not None else None
        return sample_select.sample_select_triton(s, n, kk, lo, self.m.n_local, cnt=cnt, cand=self.cand, static=True,
                                                  **self.sample)

    def _rows_prev(self, s, n, kk: int, lo: int, work: torch.Tensor | None, l: int, layers: int,
                   q=None, k=None) -> torch.Tensor:
        """prev_select_triton's row list with layer l's thresholds (``self.thr[l]``, zeros at first, kept across
        steps); ``work``: zeroed int32, else zeroed here. ``q`` / ``k`` (s None): the filter computes the scores
        itself (``prev_fused``); else q scales the thresholds (the k-th largest score is kept per unit of |q|)."""
        b, hs = (s.shape[0], s.shape[1]) if s is not None else (k.shape[0], k.shape[1] if self.m.gqa == "group"
                                                                   else q.shape[1])
        r = b * hs
        dev = k.device if s is None else s.device
        kw = {**self.prev, "cap": self.prev.get("cap") or max(1024, 1 << (4 * kk - 1).bit_length())}  # 4k, pow2
        if self.thr is None or self.thr.shape != (layers, r) or self.thr.device != dev:
            self.thr = torch.zeros(layers, r, dtype=torch.int32, device=dev)
        if self.cand is None or self.cand.numel() < r * kw["cap"] or self.cand.device != dev:
            self.cand = torch.empty(r * kw["cap"], dtype=torch.int32, device=dev)
        work = work[: prev_select.work_size(r)] if work is not None else None
        if s is None:
            return prev_scores.prev_scores_select_triton(q, k, n, kk, lo, self.m.n_local, self.m.gqa == "group",
                                                         self.thr[l], work=work, cand=self.cand, **kw)[0]
        return prev_select.prev_select_triton(s, n, kk, lo, self.m.n_local, self.thr[l], q=q.to(s.dtype),
                                              group=self.m.gqa == "group", work=work, cand=self.cand, **kw)

    def attend(self, kv, l, q, k, v, scale):
        self.q_heads = q.shape[1]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if l == 0 or self._n is None:  # every layer's valid length, once per step (layers run in order)
            self._n = kv.at + 1
            if self.work is not None:
                self.work.zero_()
        n = self._n[l : l + 1]
        merge = {"counter": self.counter} if self.merge and self.m.gqa == "head" else {}
        return paged_attention(q, k, v, self.rows(kv, l, q, n, step=True), n, 1, scale, **merge, **self.tune)

    def store_back(self, kv, cache, fed: int) -> bool:
        """Append the fed tokens to each TieredLayer; count the rows read as the plain path's ``load`` does."""
        m = self.m
        for layer, kb, vb, n in zip(cache.layers, kv.k, kv.v, kv.lengths):
            if not (ADOPT and layer.adopt(kb, vb, n + fed)) and fed:
                layer._append(kb[:, :, n : n + fed], vb[:, :, n : n + fed])
            layer.crop_floor = layer.n
            b, hkv, _, d = kb.shape
            hs = hkv if m.gqa == "group" else self.q_heads
            row = b * d * kb.element_size() * 2
            for i in range(1, fed + 1):
                rows = n + i
                if rows - m.n_local - m.n_init > m.top_k:
                    layer.loaded_bytes += row * hs * (m.n_init + m.n_local + m.top_k)
                else:
                    layer.loaded_bytes += row * hkv * rows
        return True
