"""KVzip: query-agnostic eviction by context reconstruction; compress once, reuse for every later query.

Based on Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (arXiv 2505.23416).
When compression fires, the model repeats the tokens just fed, chunk by chunk, on top of the cache
(``scbench.methods.reconstruction``: the paper's repeat prompts, 2,048-token chunks); a KV pair's score is the
maximum attention it receives from the repeat queries (over queries and the query heads of its group); the first
``n_sink`` tokens and the last ``n_recent`` (the prompt's tail) are always kept. The repeat tokens are dropped
again, so only this extra prefill (~1-2x the context's, in ``compress_s``) is paid, once: with
``policy.compress=once`` (the reference) every later turn and request reuses the compressed cache (no re-scoring;
under every_turn only the newly fed tokens are reconstructed and scored). ``budget`` is
the average kept tokens per KV head; ``level``:

- ``pair`` (the paper's default): one pool over every layer and head of the model (non-uniform across layers
  and heads), stored ragged (``scbench.kv.ragged``): the resident bytes are exactly L x Hkv x budget tokens;
- ``layer``: one pool per layer across its heads, AdaKV's allocation on KVzip scores (``layerwise`` in kvpress);
- ``uniform``: every head keeps its own top ``budget`` (dense tensors; the fast decode path applies).

Ragged levels decode through the fast path's ragged plugin (methods/ragged_fast.py) or the plain loop.
Approximations: the reconstructed tokens are those of the compressing feed, so under ``query_visible=true`` (multi-
turn reference policy) the first query and its template tokens are repeated with the context; under every_turn /
decode_every, tokens kept by an earlier firing are not re-scored: they stay before any new token (the most recent
first if they alone exceed the budget).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from scbench.kv.ragged import RaggedLayer
from scbench.methods.base import Cost, positive_int
from scbench.methods.head_budgets import allocate
from scbench.methods.reconstruction import reconstruction_scores
from scbench.methods.token_scores import TokenScorer, gather

LEVELS = ("pair", "layer", "uniform")


@dataclass
class KVzip(TokenScorer):
    """Reconstruction scores, top pairs at the budget (model-wide, per layer or per head)."""

    budget: int | float = 4096
    """Average tokens kept per layer and KV head (a count, or a ratio of the tokens seen)."""
    level: str = "pair"
    """Where the budget is pooled: pair (whole model), layer (per layer across heads) or uniform (per head)."""
    chunk: int = 2048
    """Tokens reconstructed per repeat forward (bounds the scoring memory)."""
    n_sink: int = 4
    """First tokens always kept (attention sinks)."""
    n_recent: int = 32
    """Last cached tokens always kept: the prompt's tail (the first query and the chat template's assistant header
    when the query is in the cache; the engine also rewinds answer prefixes from there). 0: none, as the paper,
    which compresses the context alone."""

    name: ClassVar[str] = "kvzip"
    costs: ClassVar[dict[str, Cost]] = {
        "score_prefill_s": Cost("s", "KVzip: time of the context-reconstruction forwards that score the KV pairs (also "
                                "inside `compress_s`; paid once per compression)", default=0.0, label="score prefill s"),
        "score_prefill_tokens": Cost("tokens", "KVzip: repeat-prompt tokens forwarded to score the KV pairs",
                                     default=0),
    }
    approximation: ClassVar[str] = (
        "reconstructs the tokens of the compressing feed (with query_visible=true the first query and its template "
        "tokens too); keeps the last n_recent tokens; tokens kept by an earlier firing are kept before new ones, "
        "not re-scored")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.level not in LEVELS:
            raise ValueError(f"KVzip.level must be one of {LEVELS}, got {self.level!r}")
        positive_int(self, "chunk")
        positive_int(self, "n_sink", minimum=0)
        positive_int(self, "n_recent", minimum=0)
        self._scores: dict[int, list[torch.Tensor]] = {}
        self._keep: dict[int, list[torch.Tensor]] = {}
        self._measured: dict = {}

    def static_decoder(self):
        """The captured-step decode plugin for ragged layers (methods/ragged_fast.py: prefixes read in place)."""
        from scbench.methods.ragged_fast import RaggedDecode

        return RaggedDecode(self)

    def prepare_compression(self, session, ids):
        """Score every cached pair by reconstruction, then (level pair) allocate the model-wide pool."""
        t0 = time.perf_counter()
        # a grouped sweep's KVzip runs at one chunk size (a budget or level sweep) reconstruct once; a reuse counts
        # the measured seconds of that computation (Method.shared_scores)
        (self._scores, tokens), shared_s = self.shared_scores(
            "reconstruction", lambda: reconstruction_scores(session, ids, self.chunk, self.n_sink))
        if session.engine.device.type == "cuda":
            torch.cuda.synchronize(session.engine.device)
        m = self._measured
        m["score_prefill_s"] = m.get("score_prefill_s", 0.0) + time.perf_counter() - t0 + shared_s
        m["score_prefill_tokens"] = m.get("score_prefill_tokens", 0) + tokens
        for per_head in self._scores.values():
            for sc in per_head:
                sc[max(0, sc.shape[0] - self.n_recent) :] = float("inf")
        self._keep = {}
        if self.level == "pair":
            layers = sorted(self._scores)
            flat = [s for i in layers for s in self._scores[i]]
            n = max(s.shape[0] for s in flat)
            cap = min(n, self.capacity(0, n))
            idx = allocate(flat, cap * len(flat))
            for j, i in enumerate(layers):
                h = len(self._scores[i])
                self._keep[i] = idx[j * h : (j + 1) * h]

    def score_key(self):
        """The reconstruction scores: the same at every budget, level and ``n_recent`` (applied to a copy)."""
        return ("KVzip.reconstruction", self.chunk, self.n_sink)

    def take_costs(self, session) -> dict:
        """The scoring prefills since the last turn (the turn whose prefill compressed; 0 in the others)."""
        out, self._measured = self._measured, {}
        return out

    def _indices(self, layer_idx: int) -> list[torch.Tensor] | None:
        """Kept positions per head, or None when the layer keeps everything."""
        if layer_idx not in self._scores:
            raise RuntimeError("KVzip.compress_cache before prepare_compression (the engine runs it first)")
        scores = self._scores[layer_idx]
        sizes = [s.shape[0] for s in scores]
        if self.level == "pair":
            idx = self._keep[layer_idx]
        else:
            cap = min(max(sizes), self.capacity(layer_idx, max(sizes)))
            if self.level == "layer":
                idx = allocate(scores, cap * len(scores))
            else:
                idx = [s.topk(min(cap, s.shape[0])).indices.sort().values for s in scores]
        if all(len(i) == n for i, n in zip(idx, sizes)):
            return None
        return idx

    def score(self, layer_idx, keys, values, queries):
        return torch.stack(self._scores[layer_idx])[None]

    def compress_cache(self, layer_idx, keys, values, queries):
        """keys, values: [1, Hkv, n, D] -> kept tensors (uniform) or a RaggedLayer (pair, layer)."""
        idx = self._indices(layer_idx)
        if idx is None:
            return keys, values
        if self.level == "uniform":
            i = torch.stack(idx)[None].to(keys.device)
            return gather(keys, i), gather(values, i)
        return RaggedLayer.from_indices(keys, values, [i.to(keys.device) for i in idx])

    def compress_ragged(self, layer_idx, layer, queries):
        idx = self._indices(layer_idx)
        if idx is None:
            return layer
        heads = [layer.head(h) for h in range(len(layer.lengths))]
        return RaggedLayer([k[i.to(k.device)] for (k, _), i in zip(heads, idx)],
                           [v[i.to(v.device)] for (_, v), i in zip(heads, idx)])
