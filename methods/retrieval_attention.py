"""RetrievalAttention: the KV lives in host memory; each decode step retrieves the top-k keys by inner product.

Based on Liu et al., "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval"
(arXiv 2409.10516), with SCBench's settings (top-k 4,096 on every layer). After the prefill each layer becomes a
``TieredLayer`` (scbench/kv/offload.py) whose keys and values sit in host memory (``tier=cpu``). At each decode
step and layer the query searches the stored keys on the host (exact inner-product search: the C host kernel
scbench/kernels/ra_host.c over the stored keys in place, or without it ``torch.topk`` over a float32 copy of
half-precision keys),
and the top ``top_k`` rows are attended ON THE HOST, while the accelerator attends over the static pattern (the
first ``n_init`` and last ``n_local`` tokens) it keeps; only the query and the host's partial result (output +
log-sum-exp) cross the bus and the halves are merged exactly (methods/retrieval_host.py, as the paper splits it).
``split: false`` (and a faiss index or ``recall``) takes the loading path instead: the top ``top_k`` rows plus the
static pattern are gathered on the host, copied to the accelerator and attended there (the reference).

Opt-in approximate search (``index: faiss_ivf | faiss_hnsw``, needs the ``faiss`` extra): when the KV is parked,
one faiss inner-product index per batch row and KV head is built over the searchable rows (IVF-Flat with
``nlist`` lists, ``nprobe`` probed; or HNSW-Flat with ``hnsw_m`` links, ``ef_search``). Rows generated later are
searched exactly until ``EXTEND_EVERY`` of them have accumulated, then added to the index; a crop below the
indexed rows rebuilds it. The candidates' exact inner products pick the top ``top_k``. With ``recall: true`` each
step also runs the exact search and records the share of the exact top-k set the index found
(cost column ``index_recall``); the build/extend time is ``index_build_s``. These are general-purpose
ANN indices over the keys, not the paper's attention-aware (query-distribution) index. The faiss indices' own
memory (a float32 copy of the indexed keys plus list ids, centroids or graph links) is reported apart as
``index_bytes`` (``AnnIndex.nbytes``, checked against ``faiss.serialize_index``), not in
``slow_tier_bytes``.
On CPU at 32K keys x 64 (scripts/bench_retrieval_index.py) IVF beats exact search at top-k 256, not at 4,096.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from scbench.kv.offload import STORAGES, Rows, TieredLayer, attend_loaded, require_tiered, tiered_layers
from scbench.methods.base import Method, positive_int
from scbench.records import Cost

GQA = ("head", "group")
INDEXES = ("exact", "faiss_ivf", "faiss_hnsw")
EXTEND_EVERY = 256
"""Generated rows searched exactly before they are added to an approximate index."""


def top_keys(q: torch.Tensor, keys: torch.Tensor, k: int, group: bool = False) -> torch.Tensor:
    """Exact maximum inner-product search: q [B, Hq, D], keys [B, Hkv, n, D] -> row indices [B, Hs, k]
    (Hs = Hq, or Hkv when ``group``: the heads sharing a KV head rank by their highest product)."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    s = q.to(keys.dtype).reshape(b, hkv, hq // hkv, d) @ keys.transpose(-1, -2)  # [B, Hkv, rep, n]
    s = s.amax(2) if group else s.reshape(b, hq, -1)
    return s.topk(k, dim=-1).indices


def topk_recall(approx: torch.Tensor, exact: torch.Tensor, n: int) -> float:
    """Mean over heads of |approx ∩ exact| / k: approx, exact [B, Hs, k] distinct row indices below ``n``."""
    hit = torch.zeros(*exact.shape[:-1], n, dtype=torch.bool, device=exact.device)
    hit.scatter_(-1, exact, True)
    return hit.gather(-1, approx.to(exact.device)).float().mean().item()


def import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError(
            "RetrievalAttention.index faiss_ivf / faiss_hnsw needs the faiss package (faiss-cpu), which is not "
            'installed: pip install -e ".[faiss]" (or index: exact)'
        ) from e
    return faiss


class AnnIndex:
    """faiss inner-product indices, one per (batch row, KV head), over rows [lo, end) of a layer's keys."""

    def __init__(self, method: "RetrievalAttention", keys: torch.Tensor, lo: int, end: int):
        faiss = import_faiss()
        b, h, _, d = keys.shape
        self.lo, self.end, self.method = lo, lo, method
        self.parts = []
        n = end - lo
        for _ in range(b * h):
            if method.index == "faiss_hnsw":
                ix = faiss.IndexHNSWFlat(d, method.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                ix.hnsw.efSearch = max(method.ef_search, method.top_k)
            else:
                nlist = method.nlist or max(1, min(int(4 * n ** 0.5), n // 39))
                ix = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
                ix.nprobe = min(method.nprobe, nlist)
                ix.train(self._rows(keys, len(self.parts), lo, end))
            self.parts.append(ix)
        self.extend(keys, end)

    def nbytes(self) -> int:
        """Host bytes the indices hold: IVF-Flat = centroids + per list (float32 code + int64 id) per row;
        HNSW-Flat = float32 codes + graph (int32 neighbour slots, levels, int64 offsets). Read from the faiss
        structures (no serialisation); the serialised size differs only by headers."""
        faiss = import_faiss()
        total = 0
        for ix in self.parts:
            if isinstance(ix, faiss.IndexHNSWFlat):
                h = ix.hnsw
                total += faiss.downcast_index(ix.storage).codes.size()
                total += 4 * (h.neighbors.size() + h.levels.size()) + 8 * h.offsets.size()
                total += 8 * h.assign_probas.size() + 4 * h.cum_nneighbor_per_level.size()
            else:
                inv = ix.invlists
                total += ix.quantizer.ntotal * ix.d * 4
                total += sum(inv.list_size(i) for i in range(inv.nlist)) * (inv.code_size + 8)
        return total

    @staticmethod
    def _rows(keys: torch.Tensor, part: int, start: int, end: int) -> np.ndarray:
        h = keys.shape[1]
        return np.ascontiguousarray(keys[part // h, part % h, start:end].numpy())

    def extend(self, keys: torch.Tensor, end: int) -> None:
        """Add rows [self.end, end) (ids: row - lo, in order)."""
        for i, ix in enumerate(self.parts):
            ix.add(self._rows(keys, i, self.end, end))
        self.end = end

    def search(self, q: torch.Tensor, keys: torch.Tensor, hi: int, k: int, group: bool) -> torch.Tensor:
        """q [B, Hq, D] float32 host; keys [B, Hkv, n, D] float32 host -> top-k rows in [lo, hi) [B, Hs, k]:
        the index's candidates over [lo, end) plus every row of [end, hi), ranked by exact inner product."""
        b, hq, d = q.shape
        hkv = keys.shape[1]
        rep, lo = hq // hkv, self.lo
        kk = min(k, self.parts[0].ntotal)
        out = []
        for i, ix in enumerate(self.parts):
            bi, g = divmod(i, hkv)
            qs = q[bi, g * rep:(g + 1) * rep].contiguous()  # [rep, D]
            dist, ids = ix.search(qs.numpy(), kk)
            ids, dist = torch.from_numpy(ids), torch.from_numpy(dist)
            valid = ids >= 0
            if group:  # exact group score (max over the heads) of the union of the heads' candidates
                cand = ids[valid].unique().view(1, -1) + lo
                cs = (keys[bi, g, cand[0]] @ qs.T).amax(-1).view(1, -1)
            else:  # IVF/HNSW-Flat distances are the exact inner products of the returned rows
                cand, cs = ids + lo, dist.masked_fill(~valid, float("-inf"))
            if hi > self.end:  # rows not indexed yet: searched exactly
                tail = qs @ keys[bi, g, self.end:hi].T  # [rep, t]
                cand = torch.cat([cand, torch.arange(self.end, hi).expand(cand.shape[0], -1)], dim=1)
                cs = torch.cat([cs, tail.amax(0, keepdim=True) if group else tail], dim=1)
            if cs.shape[1] >= k and bool(cs.isfinite().sum(1).min() >= k):
                top = cand.gather(1, cs.topk(k, dim=-1).indices)
            else:  # fewer than k candidates (few lists probed): arbitrary unscored rows fill the top-k
                full = torch.full((cs.shape[0], hi), float("-inf"))
                full.scatter_reduce_(1, cand.clamp(min=lo), cs, "amax")
                top = full[:, lo:].topk(k, dim=-1).indices + lo
            out.append(top)
        return torch.stack(out).view(b, hkv if group else hq, k)


@dataclass
class RetrievalAttention(Method):
    """Per-step top-k keys by inner product, searched in the slow tier and loaded to the accelerator."""

    top_k: int = 4096
    """Keys retrieved per decode step, layer and head (besides the static tokens)."""
    n_init: int = 128
    """First tokens always attended (static pattern)."""
    n_local: int = 512
    """Most recent tokens always attended (static pattern)."""
    gqa: str = "head"
    """``head``: each query head retrieves its own keys; ``group``: the heads sharing a KV head retrieve one set."""
    tier: str = "cpu"
    """Where the KV lives and is searched: ``cpu`` (host memory, as the paper) or ``device``."""
    recall: bool = False
    """Diagnostic: record the share of exact attention mass held by the attended tokens (reads all keys) and,
    with an approximate index, the recall of its top-k against exact search."""
    index: str = "exact"
    """Search: ``exact`` (torch.topk over all keys), ``faiss_ivf`` or ``faiss_hnsw`` (approximate, faiss-cpu)."""
    nlist: int = 0
    """faiss_ivf: inverted lists (0: 4·sqrt(rows), at most rows/39)."""
    nprobe: int = 32
    """faiss_ivf: lists probed per query (nprobe = nlist searches exhaustively)."""
    hnsw_m: int = 32
    """faiss_hnsw: links per node."""
    ef_search: int = 128
    """faiss_hnsw: search beam width (raised to top_k when smaller)."""
    search: str = "float32"
    """Host split, half-precision keys: ``float32`` searches a float32 copy of the keys (slow-tier bytes, like the
    paper's index); ``half`` the stored keys themselves (rounded products bound the candidates, which are rescored
    in float32: the same top-k, no copy, half the bytes read per step)."""
    split: bool = True
    """Host tier with exact search: the host attends over the rows it retrieved and the accelerator over the
    static pattern, merged by log-sum-exp (false: the retrieved rows are loaded to the accelerator)."""

    name: ClassVar[str] = "retrieval_attention"
    stages: ClassVar[tuple[str, ...]] = ("loading",)
    costs: ClassVar[dict[str, Cost]] = {
        "index_recall": Cost("ratio", "RetrievalAttention with an approximate index and `recall=true`: share of the "
                             "exact top-k the index found; null when not measured"),
        "index_build_s": Cost("s", "RetrievalAttention with an approximate index: time building and extending it this "
                              "turn", default=0.0),
        "attended_ratio": Cost("ratio", "RetrievalAttention host split: rows attended per decode step and query head "
                               "(retrieved on the host + static on the accelerator) / rows stored, mean over steps and "
                               "layers; null on the loading path (its `loaded_bytes` count the rows)"),
        "index_bytes": Cost("bytes", "RetrievalAttention with an approximate index: host memory its faiss indices hold "
                            "at the end of the turn (not in `slow_tier_bytes`); 0 with exact search", default=0),
    }
    fast_decode: ClassVar[bool] = False
    approximation: ClassVar[str] = (
        "exact top-k search (torch.topk over all stored keys) by default, or opt-in (index=faiss_ivf/faiss_hnsw) "
        "a general-purpose faiss inner-product index, instead of the paper's attention-aware ANN index (exact "
        "search is an upper bound on its recall at the same k); retrieved and static tokens are attended together "
        "on the host (float32) and the static tokens on the accelerator, merged by log-sum-exp as the paper does "
        "(split=false, a faiss index or recall: both are loaded to and attended on the accelerator, the same result "
        "up to rounding)"
    )

    @classmethod
    def budget_label(cls, knobs: dict) -> str:
        """``top<top_k>``: keys retrieved per step."""
        return f"top{knobs['top_k']}" if "top_k" in knobs else super().budget_label(knobs)

    def __post_init__(self) -> None:
        self.workspace = None
        """The host split's reused host buffers (methods/retrieval_search.Workspace), made at its first step."""
        positive_int(self, "top_k")
        positive_int(self, "n_init", minimum=0)
        positive_int(self, "n_local", minimum=1)
        if self.gqa not in GQA:
            raise ValueError(f"RetrievalAttention.gqa must be one of {GQA}, got {self.gqa!r}")
        if self.tier not in STORAGES:
            raise ValueError(f"RetrievalAttention.tier must be one of {STORAGES}, got {self.tier!r}")
        if self.search not in ("float32", "half"):
            raise ValueError(f"RetrievalAttention.search must be float32 or half, got {self.search!r}")
        if self.index not in INDEXES:
            raise ValueError(f"RetrievalAttention.index must be one of {INDEXES}, got {self.index!r}")
        for field in ("nlist", "nprobe", "hnsw_m", "ef_search"):
            positive_int(self, field, minimum=0 if field == "nlist" else 1)
        if self.index != "exact":
            if self.tier != "cpu":
                raise ValueError(f"RetrievalAttention.index {self.index!r} searches host memory: needs tier cpu, "
                                 f"got {self.tier!r}")
            import_faiss()

    def promises(self, *, context_tokens, q_heads, kv_heads, **_):
        """Decode loads at most top_k + the static pattern per layer and KV head (per query head with gqa=head):
        below that share of dense decoding (+2 %) and below 98 % (top_k >= the context loads everything: flagged).
        The host split promises the same of the rows it attends (``attended_ratio``)."""
        per_head = q_heads / kv_heads if self.gqa == "head" else 1.0
        if self.uses_split():  # only the query and partial results cross the bus: the rows attended are the promise
            rows = min(1.0, (self.top_k + self.n_init + self.n_local) / max(1, context_tokens))
            return {"attended_ratio": ("lt", min(0.98, rows + 0.02))}
        rows = min(1.0, per_head * (self.top_k + self.n_init + self.n_local) / max(1, context_tokens))
        return {"loaded_ratio": ("lt", min(0.98, rows + 0.02))}

    def static_decoder(self):
        """The captured-step decode plugin for the device tier with exact search (methods/retrieval_fast.py);
        None (the plain loop) for the host tier, a faiss index or ``recall``."""
        if self.tier != "device" or self.index != "exact" or self.recall:
            return None
        from scbench.methods.retrieval_fast import RetrievalDecode

        return RetrievalDecode(self)

    def compress_cache(self, layer_idx, keys, values, queries):
        """keys, values: [B, Hkv, n, D] -> a TieredLayer holding them in the tier (and its search index)."""
        layer = TieredLayer(keys, values, storage=self.tier)
        if self.uses_split():  # the static rows stay on the accelerator, copied from the prefill's keys
            from scbench.kv.split import DeviceWindow

            layer.window = DeviceWindow(self.n_init, self.n_local)
            layer.window.build(keys, values, keys.device)
        if not (self.uses_split() and self.reads_stored_keys(layer)):
            self.search_keys(layer)  # built with the offload, not inside the first decode step
        return layer

    def sync_index(self, layer: TieredLayer, keys: torch.Tensor) -> AnnIndex | None:
        """The layer's approximate index (``layer.ann``) over its searchable rows, built when the layer first has
        more than ``top_k`` of them, extended by ``EXTEND_EVERY`` generated rows, rebuilt after a crop below the
        indexed rows (call before ``search_keys``, which resets ``crop_floor``). Counts the time on the layer."""
        hi = layer.n - self.n_local
        ann = getattr(layer, "ann", None)
        if self.index == "exact" or hi - self.n_init <= self.top_k:
            return None
        t0 = time.perf_counter()
        if ann is None or ann.end > min(layer.crop_floor, hi):  # indexed rows changed or now static
            ann = layer.ann = AnnIndex(self, keys, self.n_init, hi)
        elif hi - ann.end >= EXTEND_EVERY:
            ann.extend(keys, hi)
        else:
            return ann
        layer.index_build_s = getattr(layer, "index_build_s", 0.0) + time.perf_counter() - t0
        return ann

    def select(self, q: torch.Tensor, keys: torch.Tensor, layer: TieredLayer | None = None) -> torch.Tensor | None:
        """Rows to attend: q [B, Hq, D], stored keys [B, Hkv, n, D] -> [B, Hs, m] on the keys' device, or None
        when the static tokens and top_k cover every row. With an approximate index the search goes through
        ``layer.ann`` (and, with ``recall``, its recall against exact search is counted on the layer)."""
        n = keys.shape[-2]
        lo, hi = self.n_init, n - self.n_local
        if hi - lo <= self.top_k:
            return None
        group = self.gqa == "group"
        ann = getattr(layer, "ann", None) if self.index != "exact" else None
        if ann is None:
            top = top_keys(q.to(keys.device), keys[..., lo:hi, :], self.top_k, group) + lo
        else:
            top = ann.search(q.to(keys.device, torch.float32), keys, hi, self.top_k, group)
            if self.recall:
                exact = top_keys(q.to(keys.device), keys[..., lo:hi, :], self.top_k, group)
                layer.index_recall_sum = getattr(layer, "index_recall_sum", 0.0) + topk_recall(top - lo, exact, hi - lo)
                layer.index_recall_n = getattr(layer, "index_recall_n", 0) + 1
        static = torch.cat([torch.arange(lo), torch.arange(hi, n)]).to(keys.device)
        return torch.cat([static.expand(*top.shape[:2], -1), top], dim=-1)

    def search_keys(self, layer: TieredLayer) -> torch.Tensor:
        """The keys the search scans, [B, Hkv, n, D]: the stored keys, or in host memory for half-precision
        keys a float32 copy kept in ``layer.state["index"]`` (CPU matmuls are slow in half precision; the copy
        counts as slow-tier bytes, as the paper's index does), extended with new rows and redone past a crop.
        An approximate index is kept in step (``sync_index``)."""
        if layer.storage.type != "cpu" or layer.dtype == torch.float32:
            self.sync_index(layer, layer.keys)
            layer.crop_floor = layer.n
            return layer.keys
        rows = layer.state.get("index")
        if rows is None:  # host only (never copied to the accelerator): not pinned
            rows = layer.state["index"] = Rows(layer.storage, layer.compute, torch.float32, pin=False,
                                               reserve=layer._k.reserve)
        rows.crop(layer.crop_floor)
        if rows.n < layer.n:
            rows.append(layer.keys[..., rows.n :, :])
        self.sync_index(layer, rows.view)
        layer.crop_floor = layer.n
        return rows.view

    def take_costs(self, session) -> dict:
        """Index recall and build time, and the host split's attended share, over this turn's steps and layers
        (counted on the layers, reset here) and the bytes the indices hold now."""
        layers = tiered_layers(session.cache)
        n = sum(getattr(layer, "index_recall_n", 0) for layer in layers)
        steps = sum(getattr(layer, "attended_n", 0) for layer in layers)
        out = {
            "attended_ratio": sum(getattr(layer, "attended_sum", 0.0) for layer in layers) / steps if steps else None,
            "index_recall": sum(getattr(layer, "index_recall_sum", 0.0) for layer in layers) / n if n else None,
            "index_build_s": sum(getattr(layer, "index_build_s", 0.0) for layer in layers),
            "index_bytes": sum(layer.ann.nbytes() for layer in layers if getattr(layer, "ann", None) is not None),
        }
        for layer in layers:
            layer.index_recall_sum, layer.index_recall_n, layer.index_build_s = 0.0, 0, 0.0
            layer.attended_sum, layer.attended_n = 0.0, 0
        return out

    def reads_stored_keys(self, layer: TieredLayer) -> bool:
        """Host split: whether the search reads the layer's stored keys in place (no float32 copy): ``search=half``,
        or the C host kernel (scbench/kernels/ra_host.py: float32 products of bfloat16 keys, the copy's math)."""
        from scbench.kernels import ra_host

        if layer.dtype in (torch.float32, torch.bfloat16) and layer.storage.type == "cpu" and ra_host.available():
            return True
        return self.search == "half" and layer.dtype != torch.float32

    def uses_split(self) -> bool:
        """Whether decode takes the host/accelerator split (methods/retrieval_host.py)."""
        return self.split and self.tier == "cpu" and self.index == "exact" and not self.recall

    def decode_attention(self, layer_idx, q, k, v, scale, *, layer=None):
        """q [B, Hq, 1, D]; k, v: the layer's stored rows [B, Hkv, n, D] (host memory) -> [B, Hq, 1, D]."""
        layer: TieredLayer = require_tiered(self, layer_idx, layer)
        if self.uses_split():
            from scbench.methods.retrieval_host import split_decode

            return split_decode(self, layer, q, scale)
        layer.settle()  # rows a stream path may still have queued (split turned off meanwhile)
        idx = self.select(q[:, :, 0], self.search_keys(layer), layer)
        return attend_loaded(layer, q, idx, scale, recall=self.recall)

    def batch_decoder(self):
        """Batched decode over a shared context (scbench/batch.py; methods/retrieval_batch.py) for the device tier
        with exact search; None otherwise (the host tier, a faiss index or ``recall`` decode one request at a
        time)."""
        if self.tier != "device" or self.index != "exact" or self.recall:
            return None
        from scbench.methods.retrieval_batch import RetrievalBatch

        return RetrievalBatch(self)
