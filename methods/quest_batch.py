"""Quest's batched decode (scbench/batch.py, ``timing=batched``): the requests of an example decoded together over the
one shared context, each row selecting its own pages by its own query.

``SharedPrefixKV`` (scbench/batch_step.py) holds the shared context (the session's ``TieredLayer``s, read in place)
and each row's own tokens; ``QuestBatch.attend`` answers the selecting layers (the first ``dense_layers`` take the
shared-prefix path: dense attention over context + own rows, merged exactly). Per row and layer the pages are those
of the row's own sequential run: the context's full pages keep the layer's bounds (``Quest.bounds``, scored for
every row at once on CUDA: each bound byte read once per step for the batch), the pages from the context's last
partial page on get per-row bounds; ``Quest.select``'s rule picks the pages and the row attends them, its own rows
included. On CUDA the step is three Triton launches per layer (scores, ``quest_select.threshold_select`` with each
row's length, ``quest_batch.batch_paged_triton``), capturable in the batch's CUDA graph; elsewhere the reference
(``batch_pages_torch`` / ``batch_attention_torch`` below: per row, the plain path's selection and
attention). tests/engines/test_quest_batch.py checks batched == sequential predictions (float32, CPU).

What each row would have loaded and kept in its own sequential decode is counted for its turn (``row_memory``).
"""
from __future__ import annotations

import weakref
from abc import ABC, abstractmethod

import torch

from scbench.engines.attention import causal_attention
from scbench.kernels import quest_batch as qb
from scbench.kernels.quest_scores import page_bounds
from scbench.kv.offload import device_tier_unsupported


SELECT = {"num_warps": 4, "chunk": 8192}
"""``threshold_select``'s sizes (H200, 131K, one request: 18 us per layer for 32 rows; 1 warp with 1,024-score
chunks: 55 us)."""


def weak(kv):
    """A weak proxy of a batch's KV for its plugin (the KV holds the plugin: a strong reference back is a cycle that
    keeps the decoded cache alive until the garbage collector runs), or the object itself where it takes no weak
    reference (a test's namespace)."""
    try:
        return weakref.proxy(kv)
    except TypeError:
        return kv


class SelectedRowsBatch(ABC):
    """A batched decode that attends, per row and KV head, selected rows of the shared cache plus the row's own tokens
    (Quest's pages, RetrievalAttention's top-k rows): the torch reference of ``attend`` picks them with
    ``rows_torch``; a subclass's ``_attend_triton`` runs its kernels."""

    def __init__(self, method, triton: bool | None = None):
        self.m = method
        self.kernel = "torch"
        self.want_triton = triton
        """The Triton path: None -> on CUDA (tests set True to run it in the interpreter on CPU)."""
        self.triton = False

    def dense(self, l: int) -> bool:
        """Layer ``l`` attends everything (the decode's plain attention)."""
        return False

    @abstractmethod
    def rows_torch(self, l: int, q, sk, k, nctx: list[int], n: list[int]) -> list:
        """Per row, the shared rows it attends (the plain path's selection: the reference)."""

    def attend(self, kv, l, q, k, v, scale):
        """q [B, Hq, 1, D]; k, v: the rows' own buffers [B, Hkv, Co, D] -> [B, Hq, 1, D] (None: dense layer)."""
        self._hq = q.shape[1]
        if self.dense(l):
            return None
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        sk, sv = kv.shared[l]
        if self.triton:
            return self._attend_triton(kv, l, q, k, v, sk, sv, scale)
        nctx = self.nctx[l]
        n = [c + int(a) + 1 for c, a in zip(nctx, kv.at.tolist())]
        return batch_attention_torch(q, sk, sv, k, v, self.rows_torch(l, q, sk, k, nctx, n), nctx, n, scale)


class QuestBatch(SelectedRowsBatch):
    """The batched decode of one ``Quest`` instance over one ``SharedPrefixKV``."""

    def attach(self, cache, kv) -> None:
        m = self.m
        self.kv = weak(kv)
        self.cache = cache
        self.smin, self.smax = {}, {}
        why = device_tier_unsupported(cache, "Quest batched", "it decodes one request at a time")
        if why:
            raise RuntimeError(why)
        for l, layer in enumerate(cache.layers):
            if l >= m.dense_layers:
                lo, hi = m.bounds(layer)
                self.smin[l], self.smax[l] = lo.contiguous(), hi.contiguous()
        self.nctx = kv.shared_len.tolist()  # [L][B]
        self.own0 = kv.at.tolist()  # own rows per row before the first step
        dev = kv.at.device
        self.triton = (dev.type == "cuda" if self.want_triton is None else self.want_triton) and qb.triton is not None
        if self.triton:
            self.kernel = "triton"
            self._alloc_triton()

    def _alloc_triton(self) -> None:
        """Own-page bounds from each row's keys (pages from its context's last partial page on), the score buffer
        (-inf where no kernel writes) and the merge counter: static, for the CUDA graph."""
        p, kv = self.m.page_size, self.kv
        b = kv.at.shape[0]
        self.omin, self.omax, self.s = {}, {}, {}
        self.counter = kv.at.new_zeros(b * 1024, dtype=torch.int32)
        for l in self.smin:
            sk = kv.shared[l][0]
            ok = kv.k[l]
            nctx = self.nctx[l]
            pcs = [c // p for c in nctx]
            op = max(-(-(c - pc * p + ok.shape[2]) // p) for c, pc in zip(nctx, pcs))
            hkv, d = ok.shape[1], ok.shape[3]
            omin, omax = ok.new_zeros(b, hkv, op, d), ok.new_zeros(b, hkv, op, d)
            for r in range(b):
                keys = qb.row_keys(sk, ok[r : r + 1], nctx[r], nctx[r] + self.own0[r])[:, :, pcs[r] * p :]
                t = keys.shape[2]
                full = t // p
                if full:
                    lo, hi = keys[:, :, : full * p].unflatten(2, (full, p)).aminmax(dim=3)
                    omin[r, :, :full], omax[r, :, :full] = lo[0], hi[0]
                if t % p:
                    lo, hi = keys[:, :, full * p :].aminmax(dim=2)
                    omin[r, :, full], omax[r, :, full] = lo[0], hi[0]
            self.omin[l], self.omax[l] = omin, omax
            self.s[l] = (-(-(max(pcs) + op) // 16) * 16, None)  # rows 16-aligned (vector loads); made at the first step
        self.n_rows = None

    def dense(self, l: int) -> bool:
        return l < self.m.dense_layers

    def rows_torch(self, l, q, sk, k, nctx, n):
        return batch_pages_torch(self.m, q, sk, k, self.smin[l], self.smax[l], nctx, n)

    def _attend_triton(self, kv, l, q, k, v, sk, sv, scale):
        from scbench.kernels.quest_select import threshold_select

        m, p = self.m, self.m.page_size
        b, hq = q.shape[0], q.shape[1]
        pt, s = self.s[l]
        if s is None:  # the score buffer: -inf where neither score kernel writes (set once)
            s = torch.full((b, hq, pt), float("-inf"), dtype=torch.float32, device=q.device)
            self.s[l] = (pt, s)
        nctx = kv.shared_len[l]
        qb.batch_scores_triton(q, k, self.smin[l], self.smax[l], self.omin[l], self.omax[l], nctx, kv.at, s, p,
                               m.recent_pages)
        if m.gqa == "group":
            hkv = sk.shape[1]
            s_sel = s.view(b, hkv, hq // hkv, pt).amax(2)
        else:
            s_sel = s
        n = nctx + kv.at + 1
        pages = threshold_select(s_sel, n, p, m.budget, m.recent_pages, min(pt, (m.budget - 1) // p), **SELECT)
        return qb.batch_paged_triton(q, sk, sv, k, v, pages, nctx, kv.at, scale, p, self.counter)

    def row_memory(self, b: int, lengths: list[int], fed: int) -> dict:
        """Row b's turn as its sequential decode would count it after ``fed`` decode steps: the bytes its steps
        loaded (``QuestDecode``'s count of ``Quest.select``'s rows; dense layers all rows) and the KV bytes held
        (rows, plus the page bounds each layer keeps: the selecting layers' grown to the row's full pages)."""
        from scbench.methods.quest_fast import QuestDecode

        m, p = self.m, self.m.page_size
        acc = QuestDecode(m)
        loaded = held = 0
        for l, layer in enumerate(self.cache.layers):
            _, hkv, _, d = layer.keys.shape
            elt = layer.keys.element_size()
            acc.q_heads = self.q_heads(hkv)
            hs = hkv if m.gqa == "group" else acc.q_heads
            n0 = self.nctx[l][b] + self.own0[b]
            loaded += 2 * d * elt * acc._rows_read(n0, fed, l < m.dense_layers, hkv, hs)
            held += 2 * lengths[l] * hkv * d * elt
            lo, hi = layer.state["quest"]
            pages = lo.shape[2] if l < m.dense_layers or not fed else lengths[l] // p
            held += 2 * pages * hkv * d * lo.element_size()
        return {"loaded_bytes": loaded, "kv_bytes": held}

    def q_heads(self, hkv: int) -> int:
        """Query heads (seen at the first step; without a step nothing was loaded and any count works)."""
        return getattr(self, "_hq", None) or hkv


def batch_pages_torch(method, q, shared_k, own_k, smin, smax, nctx: list[int], n: list[int]) -> list:
    """Reference (any device): per row, ``method.select`` over its page bounds (the shared context's full pages,
    then the bounds of its own pages recomputed from its keys) -> per row the rows to attend [1, Hs, m] or None."""
    p = method.page_size
    out = []
    for b in range(q.shape[0]):
        pc = nctx[b] // p
        lo, hi = page_bounds(qb.row_keys(shared_k, own_k[b : b + 1], nctx[b], n[b])[:, :, pc * p :], p)
        kmin, kmax = torch.cat([smin[:, :, :pc], lo], dim=2), torch.cat([smax[:, :, :pc], hi], dim=2)
        out.append(method.select(q[b : b + 1, :, 0], kmin, kmax, n[b]))
    return out


def batch_attention_torch(q, shared_k, shared_v, own_k, own_v, idx: list, nctx: list[int], n: list[int], scale):
    """Reference: per row, its rows ``idx[b]`` (None: all n) gathered from the shared and own buffers, then the
    plain path's attention (``engines.attention.causal_attention``, as ``offload.attend_loaded``)."""
    outs = []
    for b in range(q.shape[0]):
        k = qb.row_keys(shared_k, own_k[b : b + 1], nctx[b], n[b])
        v = qb.row_keys(shared_v, own_v[b : b + 1], nctx[b], n[b])
        if idx[b] is not None:
            hkv, hs, m = k.shape[1], idx[b].shape[1], idx[b].shape[2]
            rep = hs // hkv
            i5 = idx[b].view(1, hkv, rep, m, 1).expand(1, hkv, rep, m, k.shape[3])
            k = torch.gather(k.unsqueeze(2).expand(1, hkv, rep, n[b], k.shape[3]), 3, i5).view(1, hs, m, -1)
            v = torch.gather(v.unsqueeze(2).expand(1, hkv, rep, n[b], v.shape[3]), 3, i5).view(1, hs, m, -1)
        outs.append(causal_attention(q[b : b + 1], k, v, scale))
    return torch.cat(outs)
