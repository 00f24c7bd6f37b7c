"""AdaKV: SnapKV scores with the layer's budget shared adaptively across its KV heads, stored ragged.

Based on Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
Inference" (arXiv 2407.11550), on top of SnapKV as in the paper's main setting. A layer keeps ``Hkv x capacity``
tokens in all (the same total as SnapKV at the same budget): every head keeps its observation window; the prefix
budget ``Hkv x (capacity - window)`` goes to the best SnapKV scores over all heads of the layer together (heads
whose attention is concentrated need few tokens, dispersed heads get more), after each head got its own best
``alpha x (capacity - window)`` (the paper's safety floor, alpha = 0.2). Scores are comparable across heads
because SnapKV's are softmax weights. The kept tokens are stored ragged (``scbench.kv.ragged.RaggedLayer``): the
resident bytes are exactly the kept tokens, no padding or masking, so they fall by the nominal ratio. Decoding
takes the static / CUDA-graph fast path through the ragged plugin (methods/ragged_fast.py: each head's prefix read
in place) where the engine's decode mode asks for it, else the plain loop (per-head attention, the reference).
A later firing (``every_turn`` / ``decode_every``) re-scores each head on its own tokens and re-allocates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from scbench.kv.ragged import RaggedLayer
from scbench.methods.head_budgets import allocate
from scbench.methods.snapkv import SnapKV


def keep_ragged(heads, scores, capacity: int, recent: int, alpha: float) -> RaggedLayer:
    """heads: per KV head (keys [n_h, D], values [n_h, D]); scores: per head [n_h] (the last ``recent`` entries are
    the window, always kept) -> the layer keeping ``len(heads) x capacity`` tokens (fewer where heads are short)."""
    prefix = [s[: s.shape[0] - recent] for s in scores]
    idx = allocate(prefix, len(heads) * (capacity - recent), int(alpha * (capacity - recent)))
    keys, values = [], []
    for (k, v), i in zip(heads, idx):
        n = k.shape[0]
        i = torch.cat([i.to(k.device), torch.arange(n - recent, n, device=k.device)])
        keys.append(k[i])
        values.append(v[i])
    return RaggedLayer(keys, values)


@dataclass
class AdaKV(SnapKV):
    """SnapKV scores, per-head budgets from one pool per layer, ragged storage."""

    alpha: float = 0.2
    """Safety floor: each head first keeps its best alpha x (capacity - window) tokens (0: pure top-k pool)."""

    name: ClassVar[str] = "adakv"
    fast_decode: ClassVar[bool] = True
    """Batched decoding takes its ragged layers (scbench/kernels/ragged_shared.py); the static / CUDA-graph path takes
    them through ``static_decoder``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"AdaKV.alpha must be in [0, 1], got {self.alpha!r}")

    def static_decoder(self):
        """The captured-step decode plugin for ragged layers (methods/ragged_fast.py: prefixes read in place)."""
        from scbench.methods.ragged_fast import RaggedDecode

        return RaggedDecode(self)

    def compress_cache(self, layer_idx, keys, values, queries):
        """keys, values: [1, Hkv, n, D] -> a RaggedLayer of Hkv x min(n, capacity) tokens (or the input when within)."""
        n = keys.shape[-2]
        cap = min(n, self.capacity(layer_idx, n))
        if cap >= n:
            return keys, values
        recent = min(cap, self.recent(cap, queries))
        scores = self.shared_scores(layer_idx, lambda: self.score(layer_idx, keys, values, queries))[0][0]
        heads = [(keys[0, h], values[0, h]) for h in range(keys.shape[1])]
        return keep_ragged(heads, list(scores), cap, recent, self.alpha)

    def compress_ragged(self, layer_idx, layer, queries):
        """A later firing on a ragged layer: each head scored on its own tokens, then one pool again."""
        hkv = len(layer.lengths)
        g = queries.shape[1] // hkv if queries is not None else 0
        heads = [layer.head(h) for h in range(hkv)]
        n = max(k.shape[0] for k, _ in heads)
        cap = min(n, self.capacity(layer_idx, n))
        recent = min(cap, min(k.shape[0] for k, _ in heads), self.recent(cap, queries))
        scores = [
            self.score(layer_idx, k[None, None], v[None, None], queries[:, h * g : (h + 1) * g] if g else None)[0, 0]
            for h, (k, v) in enumerate(heads)
        ]
        return keep_ragged(heads, scores, cap, recent, self.alpha)
