"""RetrievalAttention's batched decode (device tier, exact search; scbench/batch.py, ``timing=batched``): the requests
of an example decoded together over the one shared context, each row retrieving its own top-k keys by its own query.

``SharedPrefixKV`` (scbench/batch_step.py) holds the shared context (the session's device-tier ``TieredLayer``s,
read in place) and each row's own tokens. Row b's keys are the context's first ``nctx[b]`` rows followed by its own;
per step and layer it attends what its sequential decode attends (``RetrievalAttention.select`` over those keys):
the first ``n_init`` rows, the last ``n_local`` and the ``top_k`` highest inner products in between.

- Reference (any device, ``retrieval_rows_torch``): per row, ``select`` over its concatenated keys, then the plain
  attention over the gathered rows (``methods.quest_batch.batch_attention_torch``).
- CUDA (Triton): the context keys are scored for every row of the batch in one product (each key read once per
  step for the batch), the rows' differing search ends are masked in a narrow window, one radix select
  (``scbench.kernels.topk_select``) picks every (row, head)'s top-k, and ``scbench.kernels.quest_batch``'s paged
  kernel (pages of one row) attends the listed rows of the shared and own buffers, merging its splits. It needs every
  row's search range inside the shared context (its own tokens, the generated ones included, within the last
  ``n_local``) and longer than ``top_k``; otherwise the batch takes the reference. Captured in the batch's CUDA graph.

What each row's sequential decode would have loaded and kept is counted for its turn (``row_memory``).
tests/engines/test_retrieval_batch.py: batched == sequential rows (float32, CPU) and the Triton path == the reference.
"""
from __future__ import annotations

import torch

from scbench.kernels import quest_batch as qb
from scbench.kernels import prev_select, topk_select
from scbench.kv.offload import device_tier_unsupported
from scbench.methods.quest_batch import SelectedRowsBatch, weak

PAGED = {"pages_per_split": 256, "block_pages": 64}
"""``batch_paged_triton``'s sizes in rows (as the sequential decode's ``paged_attention``)."""


class RetrievalBatch(SelectedRowsBatch):
    """The batched decode of one ``RetrievalAttention`` instance (device tier, exact search) over a ``SharedPrefixKV``."""

    def __init__(self, method, triton: bool | None = None):
        super().__init__(method, triton)
        from scbench.methods.retrieval_fast import SELECT

        self.select = SELECT
        """``prev``: bfloat16 scores take ``prev_select`` (thresholds carried per layer in ``thr``), else radix."""
        self.thr: dict = {}

    def attach(self, cache, kv) -> None:
        m = self.m
        self.kv, self.cache = weak(kv), cache
        why = device_tier_unsupported(cache, "RetrievalAttention batched", "it decodes one request at a time")
        if why:
            raise RuntimeError(why)
        self.nctx = kv.shared_len.tolist()  # [L][B]
        self.own0 = kv.at.tolist()  # own rows per row before the first step
        dev = kv.at.device
        steps = kv.k[0].shape[2] - max(self.own0)  # own buffer capacity left: the decode's steps at most
        reach = [max(nc[b] + self.own0[b] for b in range(len(self.own0))) for nc in self.nctx]
        lowest = [min(nc[b] + self.own0[b] for b in range(len(self.own0))) for nc in self.nctx]
        fits = (max(self.own0) + steps <= m.n_local  # own rows never enter the search range
                and all(lo + 1 - m.n_local - m.n_init > m.top_k for lo in lowest))  # every row selects top_k
        self.triton = ((dev.type == "cuda" if self.want_triton is None else self.want_triton)
                       and qb.triton is not None and topk_select.triton is not None and fits)
        if self.triton:
            self.kernel = "triton"
            self.width = [r - lo for r, lo in zip(reach, lowest)]  # rows' search ends differ by at most this
            self.counter = kv.at.new_zeros(kv.at.shape[0] * 1024, dtype=torch.int32)  # the merge's (left at 0)

    def rows_torch(self, l, q, sk, k, nctx, n):
        return retrieval_rows_torch(self.m, q, sk, k, nctx, n)

    def _attend_triton(self, kv, l, q, k, v, sk, sv, scale):
        m = self.m
        b, hq, _, d = q.shape
        hkv, c = sk.shape[1], sk.shape[2]
        g = hq // hkv
        nctx = kv.shared_len[l]
        n = nctx + kv.at + 1  # [B]: each row's keys after this step's
        hi = n - m.n_local  # [B]: each row's search end (inside the shared context)
        # every row's scores against the shared keys, each key read once: [Hkv, B * g, C] -> [Hkv, B, g, C]
        qh = q.view(b, hkv, g, d).transpose(0, 1).reshape(hkv, b * g, d).to(sk.dtype)
        s = (qh @ sk[0].transpose(-1, -2)).view(hkv, b, g, c)
        if m.gqa == "group":
            s = s.amax(2, keepdim=True)
        w = self.width[l]
        if w:  # rows whose search ends before the batch's last end: their rows [hi_b, max hi) masked
            idx = (hi.min() + torch.arange(w, device=q.device)).clamp_max(c - 1)
            win = s.index_select(3, idx)
            s.index_copy_(3, idx, win.masked_fill(idx.view(1, 1, 1, w) >= hi.view(1, b, 1, 1), float("-inf")))
        hs = s.shape[2]
        end = (hi.max() + m.n_local).view(1)
        if self.select == "prev" and s.dtype == torch.bfloat16:  # rows of (kvh, b, h) as qh's: |q| scales each
            r, cap = hkv * b * hs, max(1024, 1 << (4 * m.top_k - 1).bit_length())
            if l not in self.thr or self.thr[l].numel() != r or self.thr[l].device != s.device:
                self.thr[l] = torch.zeros(r, dtype=torch.int32, device=s.device)
            top = prev_select.prev_select_triton(s.view(hkv, b * hs, c), end, m.top_k, m.n_init, m.n_local,
                                                 self.thr[l], q=qh.view(hkv, b * g, 1, d), group=m.gqa == "group",
                                                 static=False, cap=cap)
        else:
            top = topk_select.radix_select_triton(s.view(hkv, b * hs, c), end, m.top_k, m.n_init,
                                                  m.n_local)  # [Hkv * B * hs, top_k], rows of (kvh, b, h)
        top = top.view(hkv, b, hs, m.top_k).transpose(0, 1).reshape(b, hkv * hs, m.top_k)
        init = torch.arange(m.n_init, device=q.device, dtype=torch.int32).expand(b, m.n_init)
        local = (hi.view(b, 1) + torch.arange(m.n_local, device=q.device).view(1, -1)).to(torch.int32)
        static = torch.cat([init, local], 1).view(b, 1, -1).expand(b, hkv * hs, -1)
        pages = torch.cat([static, top], 2)
        return qb.batch_paged_triton(q, sk, sv, k, v, pages, nctx, kv.at, scale, 1, self.counter, **PAGED)

    def row_memory(self, b: int, lengths: list[int], fed: int) -> dict:
        """Row b's turn as its sequential decode counts it after ``fed`` decode steps (``RetrievalDecode.store_back``):
        the rows each step loaded (static pattern + top_k per query head, or every row while that is fewer) and the
        KV bytes held (every key and value stays on the device)."""
        m = self.m
        loaded = held = 0
        for l, layer in enumerate(self.cache.layers):
            _, hkv, _, d = layer.keys.shape
            row = d * layer.keys.element_size() * 2
            hs = hkv if m.gqa == "group" else (getattr(self, "_hq", None) or hkv)
            n0 = self.nctx[l][b] + self.own0[b]
            for i in range(1, fed + 1):
                rows = n0 + i
                if rows - m.n_local - m.n_init > m.top_k:
                    loaded += row * hs * (m.n_init + m.n_local + m.top_k)
                else:
                    loaded += row * hkv * rows
            held += row * hkv * lengths[l]
        return {"loaded_bytes": loaded, "kv_bytes": held}


def retrieval_rows_torch(method, q, shared_k, own_k, nctx: list[int], n: list[int]) -> list:
    """Reference (any device): per row, ``method.select`` over its keys (the shared context's first ``nctx[b]``
    rows, then its own up to ``n[b]``) -> per row the rows to attend [1, Hs, m], or None (every row)."""
    return [method.select(q[r : r + 1, :, 0], qb.row_keys(shared_k, own_k[r : r + 1], nctx[r], n[r]))
            for r in range(q.shape[0])]
