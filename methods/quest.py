"""Quest: query-aware page selection at decode time; the full KV stays stored, each step loads a few pages.

Based on Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (arXiv 2406.10774),
with SCBench's settings (pages of 16 tokens; token budget 4,096 as in the paper, 1,024 in the reference code:
configs ``quest`` and ``quest-ref``). After the prefill each layer becomes a ``TieredLayer`` (scbench/kv/offload.py)
holding the whole KV in its storage tier (``tier=device``: accelerator memory, as Quest; ``tier=cpu``: host
memory) plus per-page, per-channel min/max key bounds kept on the accelerator. At each decode step and layer the
upper bound of q.k over a page, ``sum_d max(q_d * min_d, q_d * max_d)``, ranks the full pages; the top pages up to
the token budget are loaded together with the newest ``recent_pages`` (the page being filled) and attended
exactly. The first ``dense_layers`` layers attend densely, as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scbench.kernels.quest_scores import page_bounds, page_scores  # noqa: F401 - Quest's page bounds and bound scores (shared)
from scbench.kv.offload import STORAGES, TieredLayer, attend_loaded, require_tiered
from scbench.methods.base import Method, positive_int

GQA = ("head", "group")


def reference_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Plain loop over heads and pages of ``sum_d max(q_d * min_d, q_d * max_d)`` in float64."""
    b, hq, _ = q.shape
    rep = hq // kmin.shape[1]
    out = torch.empty(b, hq, kmin.shape[2], dtype=torch.float64)
    for i in range(b):
        for h in range(hq):
            qh = q[i, h].double()
            for p in range(kmin.shape[2]):
                lo, hi = kmin[i, h // rep, p].double(), kmax[i, h // rep, p].double()
                out[i, h, p] = torch.maximum(qh * lo, qh * hi).sum()
    return out


@dataclass
class Quest(Method):
    """Per-step top pages by a min/max key bound, loaded from the storage tier."""

    budget: int = 4096
    """Tokens attended per decode step, layer and head: selected pages plus the recent pages."""
    page_size: int = 16
    """Tokens per page."""
    recent_pages: int = 1
    """Newest pages always attended (1: the page holding the newest token, as Quest)."""
    dense_layers: int = 2
    """The first layers attend densely (Quest skips the first two)."""
    gqa: str = "head"
    """``head``: each query head selects its own pages; ``group``: the heads sharing a KV head select one set
    by their highest bound (loads 1/group of the bytes)."""
    tier: str = "device"
    """Where the full KV lives: ``device`` (accelerator memory, as Quest) or ``cpu`` (host memory)."""
    recall: bool = False
    """Diagnostic: record the share of exact attention mass held by the attended tokens (reads all keys)."""

    name: ClassVar[str] = "quest"
    stages: ClassVar[tuple[str, ...]] = ("loading",)
    fast_decode: ClassVar[bool] = False
    approximation: ClassVar[str] = (
        "GQA models: each query head ranks pages with its KV head's bounds (gqa=head) or a group shares one "
        "selection (gqa=group); the paper covers MHA models. Selected rows are gathered and attended with SDPA "
        "in the plain loop; the fast decode path attends to the selected pages in place (Triton on CUDA)"
    )

    def __post_init__(self) -> None:
        positive_int(self, "budget")
        positive_int(self, "page_size")
        positive_int(self, "recent_pages")
        positive_int(self, "dense_layers", minimum=0)
        if self.budget < self.page_size * self.recent_pages:
            raise ValueError(f"Quest.budget must be >= page_size * recent_pages = "
                             f"{self.page_size * self.recent_pages}, got {self.budget}")
        if self.gqa not in GQA:
            raise ValueError(f"Quest.gqa must be one of {GQA}, got {self.gqa!r}")
        if self.tier not in STORAGES:
            raise ValueError(f"Quest.tier must be one of {STORAGES}, got {self.tier!r}")

    def promises(self, *, context_tokens, num_layers, q_heads, kv_heads, **_):
        """Decode loads at most ``budget`` rows per selecting layer and KV head (per query head with gqa=head),
        everything in the dense layers: below that share of dense decoding (+2 %), and below 98 % (a budget >= the
        context loads all: flagged)."""
        per_head = q_heads / kv_heads if self.gqa == "head" else 1.0
        rows = min(1.0, per_head * self.budget / max(1, context_tokens))
        dense = min(self.dense_layers, num_layers)
        return {"loaded_ratio": ("lt", min(0.98, (dense + (num_layers - dense) * rows) / num_layers + 0.02))}

    def static_decoder(self):
        """The captured-step decode plugin (methods/quest_fast.py); None with ``recall`` (a diagnostic that reads
        every key on the host each step: the plain loop)."""
        if self.recall:
            return None
        from scbench.methods.quest_fast import QuestDecode

        return QuestDecode(self)

    def batch_decoder(self):
        """Batched decode over a shared context (scbench/batch.py; methods/quest_batch.py); None with ``recall``
        or the host tier (the plain loop decodes those one request at a time)."""
        if self.recall or self.tier != "device":
            return None
        from scbench.methods.quest_batch import QuestBatch

        return QuestBatch(self)

    def compress_cache(self, layer_idx, keys, values, queries):
        """keys, values: [B, Hkv, n, D] -> a TieredLayer holding them, with the page bounds of the full pages."""
        layer = TieredLayer(keys, values, storage=self.tier)
        layer.state["quest"] = page_bounds(keys, self.page_size)
        return layer

    def bounds(self, layer: TieredLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's page bounds [B, Hkv, n // page, D], extended to new full pages and redone past a crop."""
        p = self.page_size
        kmin, kmax = layer.state["quest"]
        valid = min(kmin.shape[-2], layer.crop_floor // p)
        full = layer.n // p
        if valid != kmin.shape[-2] or full > valid:
            kmin, kmax = kmin[..., :valid, :], kmax[..., :valid, :]
            if full > valid:
                lo, hi = page_bounds(layer.load_range(valid * p, full * p), p)
                kmin, kmax = torch.cat([kmin, lo], dim=-2), torch.cat([kmax, hi], dim=-2)
            layer.state["quest"] = (kmin, kmax)
        layer.crop_floor = layer.n
        return kmin, kmax

    def select(self, q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n: int) -> torch.Tensor | None:
        """Token rows to attend: q [B, Hq, D], bounds [B, Hkv, >= candidates, D], n rows stored ->
        [B, Hs, m] (Hs = Hq for gqa=head, Hkv for group), or None when the budget covers every row."""
        p = self.page_size
        r0 = max(0, ((n - 1) // p - self.recent_pages + 1) * p)
        cand, pick = r0 // p, (self.budget - (n - r0)) // p
        if pick >= cand:
            return None
        s = page_scores(q, kmin[..., :cand, :], kmax[..., :cand, :])
        b, hkv = kmin.shape[:2]
        if self.gqa == "group":
            s = s.reshape(b, hkv, -1, cand).amax(2)
        pages = s.topk(pick, dim=-1).indices
        rows = (pages.unsqueeze(-1) * p + torch.arange(p, device=q.device)).flatten(-2)
        recent = torch.arange(r0, n, device=q.device).expand(*rows.shape[:2], -1)
        return torch.cat([rows, recent], dim=-1)

    def decode_attention(self, layer_idx, q, k, v, scale, *, layer=None):
        """q [B, Hq, 1, D]; k, v: the layer's stored rows [B, Hkv, n, D] -> [B, Hq, 1, D]."""
        layer = require_tiered(self, layer_idx, layer)
        if layer_idx < self.dense_layers:
            return attend_loaded(layer, q, None, scale)
        kmin, kmax = self.bounds(layer)
        idx = self.select(q[:, :, 0], kmin, kmax, layer.n)
        return attend_loaded(layer, q, idx, scale, recall=self.recall)
