"""RetrievalAttention: the KV lives in host memory; each decode step retrieves the top-k keys by inner product.

Based on Liu et al., "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval"
(arXiv 2409.10516), with SCBench's settings (top-k 4,096 on every layer). After the prefill each layer becomes a
``TieredLayer`` (scbench/kv/offload.py) whose keys and values sit in host memory (``tier=cpu``). At each decode
step and layer the query searches the stored keys on the host (exact inner-product search, ``torch.topk``, over
a float32 copy of half-precision keys),
and the top ``top_k`` rows plus a static pattern (the first ``n_init`` and last ``n_local`` tokens) are copied
to the accelerator and attended exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scbench.kv.offload import STORAGES, Rows, TieredLayer, attend_loaded, require_tiered
from scbench.methods.base import Method, positive_int

GQA = ("head", "group")


def top_keys(q: torch.Tensor, keys: torch.Tensor, k: int, group: bool = False) -> torch.Tensor:
    """Exact maximum inner-product search: q [B, Hq, D], keys [B, Hkv, n, D] -> row indices [B, Hs, k]
    (Hs = Hq, or Hkv when ``group``: the heads sharing a KV head rank by their highest product)."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    s = q.to(keys.dtype).reshape(b, hkv, hq // hkv, d) @ keys.transpose(-1, -2)  # [B, Hkv, rep, n]
    s = s.amax(2) if group else s.reshape(b, hq, -1)
    return s.topk(k, dim=-1).indices


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
    """Diagnostic: record the share of exact attention mass held by the attended tokens (reads all keys)."""

    name: ClassVar[str] = "retrieval_attention"
    stages: ClassVar[tuple[str, ...]] = ("loading",)
    fast_decode: ClassVar[bool] = False
    approximation: ClassVar[str] = (
        "exact top-k search (torch.topk over all stored keys) instead of the paper's attention-aware ANN index: "
        "an upper bound on its recall at the same k; retrieved and static tokens are attended together on the "
        "accelerator (the paper splits CPU and GPU attention and merges them: the same result up to rounding); "
        "the static tokens are loaded every step instead of staying on the GPU"
    )

    def __post_init__(self) -> None:
        positive_int(self, "top_k")
        positive_int(self, "n_init", minimum=0)
        positive_int(self, "n_local", minimum=1)
        if self.gqa not in GQA:
            raise ValueError(f"RetrievalAttention.gqa must be one of {GQA}, got {self.gqa!r}")
        if self.tier not in STORAGES:
            raise ValueError(f"RetrievalAttention.tier must be one of {STORAGES}, got {self.tier!r}")

    def compress_cache(self, layer_idx, keys, values, queries):
        """keys, values: [B, Hkv, n, D] -> a TieredLayer holding them in the tier (and its search index)."""
        layer = TieredLayer(keys, values, storage=self.tier)
        self.search_keys(layer)  # built with the offload, not inside the first decode step
        return layer

    def select(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        """Rows to attend: q [B, Hq, D], stored keys [B, Hkv, n, D] -> [B, Hs, m] on the keys' device, or None
        when the static tokens and top_k cover every row."""
        n = keys.shape[-2]
        lo, hi = self.n_init, n - self.n_local
        if hi - lo <= self.top_k:
            return None
        top = top_keys(q.to(keys.device), keys[..., lo:hi, :], self.top_k, self.gqa == "group") + lo
        static = torch.cat([torch.arange(lo), torch.arange(hi, n)]).to(keys.device)
        return torch.cat([static.expand(*top.shape[:2], -1), top], dim=-1)

    @staticmethod
    def search_keys(layer: TieredLayer) -> torch.Tensor:
        """The keys the search scans, [B, Hkv, n, D]: the stored keys, or in host memory for half-precision
        keys a float32 copy kept in ``layer.state["index"]`` (CPU matmuls are slow in half precision; the copy
        counts as slow-tier bytes, as the paper's index does), extended with new rows and redone past a crop."""
        if layer.storage.type != "cpu" or layer.dtype == torch.float32:
            return layer.keys
        rows = layer.state.setdefault("index", Rows(layer.storage, layer.compute, torch.float32))
        rows.crop(layer.crop_floor)
        if rows.n < layer.n:
            rows.append(layer.keys[..., rows.n :, :])
        layer.crop_floor = layer.n
        return rows.view

    def decode_attention(self, layer_idx, q, k, v, scale, *, layer=None):
        """q [B, Hq, 1, D]; k, v: the layer's stored rows [B, Hkv, n, D] (host memory) -> [B, Hq, 1, D]."""
        layer: TieredLayer = require_tiered(self, layer_idx, layer)
        idx = self.select(q[:, :, 0], self.search_keys(layer))
        return attend_loaded(layer, q, idx, scale, recall=self.recall)
