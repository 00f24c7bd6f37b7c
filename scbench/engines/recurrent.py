"""Sessions for models whose cache holds a recurrent state: Mamba, Mamba-2, hybrids (Jamba, Zamba2, Falcon-H1,
Bamba, Granite-4, Nemotron-H, LFM2) and gated linear attention (Qwen3-Next / OLMo-hybrid gated DeltaNet, Kimi KDA).

The model itself is the method (SCBENCH.md s.5, "O(k) state"). In transformers 5.x these models keep a
``DynamicCache`` whose layers are ``LinearAttentionLayer`` (conv + recurrent state of fixed size), attention
layers, or both in one layer. State reuse (``reuse: true``) feeds only each turn's new tokens on top of the state,
as KV reuse does; ``reuse: false`` re-runs the whole input every turn, as the reference does for Mamba models.

A recurrent state cannot be cropped, so this session:
- checkpoints by cloning every linear layer's state and recording the attention layers' lengths (attention KV
  crops exactly; it is cloned too when later steps may rewrite it);
- takes automatic marks in ``feed``: the state ``TAIL`` tokens before the end of the fed ids (the feed is split
  there) and at its end. ``drop_last`` (generated tokens, a forced assistant prefix) restores the nearest mark and
  re-forwards the few tokens between the mark and the target; those tokens are charged to the next feed as
  computed, not reused. A feed in which a method compresses or sparsifies is not split (that would change what
  the method sees): dropping into such a feed raises.

Counted per turn: ``kv_bytes`` (attention layers' KV) and ``state_bytes`` (conv + recurrent states), both from the
real tensors.
"""
from __future__ import annotations

import inspect
import time
from types import SimpleNamespace

import torch

from scbench.devices import sync as _sync
from scbench.engines import attention
from scbench.engines.base import FeedStats
from scbench.engines.hf_session import HFSession
from scbench.kv import cache as kvc

TAIL = 16
"""Tokens before the end of a feed where an automatic mark is taken (forced assistant prefixes are shorter)."""

STEPWISE = {"mamba", "falcon_mamba", "jamba"}
"""Model types (Mamba-1 mixers) whose multi-token forward restarts the SSM scan from a zero state in transformers
5.23 (``mamba_selective_scan`` takes no initial state): on top of a state they are fed one token at a time (exact,
slower: tests/engines/test_hybrid_models.py::test_state_carries_the_context fails without it)."""

OWN_STATE = {
    "recurrent_gemma": "keeps its recurrent state inside the model's modules, not in the cache",
    "rwkv": "passes its state as a separate `state` tuple, not a Cache",
    "xlstm": "uses its own xLSTMCache",
    "minimax": "uses its own MiniMaxCache",
    "zamba": "(Zamba v1) uses Mamba-1 mixers; use Zamba2",
}
"""Recurrent model types whose state this session cannot hold (checked in transformers 5.23)."""


_KV_FIELDS = ("keys", "values", "is_initialized")
"""Attribute names of a hybrid layer's attention part (handled through the attention lengths / KV copies)."""


def _clone(value):
    """Deep copy of tensors inside dicts / lists; other values (flags, sizes, dtypes) are shared."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def check_state_in_cache(config) -> None:
    """Raise for recurrent model types whose state lives outside a ``DynamicCache`` (``OWN_STATE``)."""
    model_type = getattr(config, "model_type", "")
    if model_type in OWN_STATE:
        raise ValueError(f"model type {model_type!r} {OWN_STATE[model_type]}: scbench cannot reuse or snapshot its state")


def is_recurrent(model) -> bool:
    """True when the model's cache has linear-attention (conv / recurrent state) layers; raises for recurrent
    models whose state lives outside a ``DynamicCache``."""
    from transformers import DynamicCache
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    check_state_in_cache(model.config)
    cache = DynamicCache(config=model.config)
    return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers)


class RecurrentSession(HFSession):
    """One example's cache for a model with recurrent state (see the module docstring)."""

    def __init__(self, engine, method):
        from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

        super().__init__(engine, method)
        layers = self.cache.layers
        sliding = [i for i, layer in enumerate(layers) if getattr(layer, "is_sliding", False)]
        if sliding:
            raise ValueError(f"model {engine.model_name!r}: sliding-window attention layers {sliding} next to a recurrent "
                             "state are not supported (scbench's attention function does not apply the window)")
        self.linear = [i for i, layer in enumerate(layers) if isinstance(layer, LinearAttentionCacheLayerMixin)]
        self.attn = [i for i, layer in enumerate(layers) if isinstance(layer, DynamicLayer)]
        other = sorted(set(self.hooks) - {"compress_cache", "prefill_attention", "compress_context"})
        if other:
            raise ValueError(f"method {method.name!r} uses {', '.join(other)}, which recurrent/hybrid models do not "
                             "support; they run with full, prompt compression, KV compression or sparse prefill methods")
        acting = sorted({"compress_cache", "prefill_attention"} & set(self.hooks))
        if acting and not self.attn:
            raise ValueError(f"method {method.name!r} acts on attention ({', '.join(acting)}) but model "
                             f"{engine.model_name!r} has no attention layers")
        params = inspect.signature(engine.model.forward).parameters
        # transformers >= 5.24 names the argument ``cache`` (``past_key_values`` / ``cache_params`` become deprecated
        # aliases, and Jamba-style models silently ignore ``cache_params``); older releases use one of the two
        self.cache_kw = next((k for k in ("cache", "past_key_values") if k in params), "cache_params")
        self.stepwise = engine.model.config.model_type in STEPWISE
        self.ids: list[int] = []
        """Every token the state has seen, in order (re-forwarded from a mark by drop_last)."""
        self.marks: list[tuple] = []
        self.token_bytes = 0
        """KV bytes per token of all attention layers together, measured on the first forward."""
        self._replayed = 0
        self._replay_s = 0.0

    # --- forward ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, ids: list[int], ctx: attention.AttnContext | None = None) -> torch.Tensor:
        if self.stepwise and self.pos > 0 and len(ids) > 1:
            for tok in ids[:-1]:
                self._forward_chunk([tok], ctx)
            ids = ids[-1:]
        return self._forward_chunk(ids, ctx)

    def _forward_chunk(self, ids: list[int], ctx) -> torch.Tensor:
        dev = self.engine.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        position_ids = torch.arange(self.pos, self.pos + len(ids), device=dev).unsqueeze(0)
        with attention.active(ctx or attention.AttnContext()):
            out = self.engine.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                                    **{self.cache_kw: self.cache})
        self.pos += len(ids)
        self.ids += ids
        if not self.token_bytes and self.attn:
            self.token_bytes = sum(layer.keys[0, :, :1].numel() * layer.keys.element_size()
                                   + layer.values[0, :, :1].numel() * layer.values.element_size()
                                   for layer in self._attn_view().layers if layer.is_initialized)
        return out.logits[0, -1]

    def feed(self, ids, *, compress, sparse):
        if not ids:
            raise ValueError("feed() needs at least one token")
        acting = (compress and "compress_cache" in self.hooks) or (sparse and "prefill_attention" in self.hooks)
        reused = self.pos - self._replayed
        parts = []
        cut = max(len(ids) - TAIL, 0) if not acting else len(ids)
        if cut:
            parts.append(super().feed(ids[:cut], compress=compress, sparse=sparse))
        self.marks = [self._snapshot()] if not acting else []
        if cut < len(ids):
            parts.append(super().feed(ids[cut:], compress=compress, sparse=sparse))
        self.marks.append(self._snapshot())
        stats = FeedStats(tokens=len(ids) + self._replayed, reused=reused, seconds=self._replay_s,
                          compress_s=sum(p.compress_s for p in parts))
        for p in parts:
            stats.seconds += p.seconds
            stats.attn_cells += p.attn_cells
            stats.attn_computed += p.attn_computed
        self._replayed, self._replay_s = 0, 0.0
        return stats

    @torch.inference_mode()
    def _compress(self, ctx: attention.AttnContext, ids: list[int]) -> None:
        """The parent's compression over the attention layers only (linear layers hold no KV)."""
        real = self.cache
        skip = SimpleNamespace(is_initialized=False)
        self.cache = SimpleNamespace(layers=[layer if i in self.attn else skip for i, layer in enumerate(real.layers)])
        try:
            super()._compress(ctx, ids)
        finally:
            for i in self.attn:
                if i in self.linear and real.layers[i] is not self.cache.layers[i]:
                    raise ValueError(f"{type(self.method).__name__} replaced cache layer {i}, which also holds a "
                                     "recurrent state: only (keys, values) results are supported on hybrid layers")
                real.layers[i] = self.cache.layers[i]
            self.cache = real

    # --- snapshots ----------------------------------------------------------------------------------
    def _attn_view(self):
        """The attention layers as a cache-like object for the ``scbench.kv.cache`` helpers."""
        return SimpleNamespace(layers=[self.cache.layers[i] for i in self.attn])

    def _snapshot(self, kv: bool = False) -> tuple:
        """(pos, linear layers' state copies, attention lengths, attention KV copies when ``kv``)."""
        state = {i: _clone({k: v for k, v in vars(self.cache.layers[i]).items() if k not in _KV_FIELDS})
                 for i in self.linear}
        lengths = [layer.get_seq_length() if layer.is_initialized else 0 for layer in self._attn_view().layers]
        return self.pos, state, lengths, kvc.snapshot(self._attn_view()) if kv else None

    def _restore(self, snap: tuple) -> None:
        pos, state, lengths, kv = snap
        for i, fields in state.items():
            vars(self.cache.layers[i]).update(_clone(fields))  # clone again: the cache updates states in place
        view = self._attn_view()
        if kv is not None:
            kvc.restore(view, kv)
        else:
            kvc.crop_layers(view, [n for n, layer in zip(lengths, view.layers, strict=True) if layer.is_initialized])
        self.pos = pos
        del self.ids[pos:]
        self.last_logits = None

    def checkpoint(self, *, rewrites):
        kvc.freeze(self.cache)  # as HFSession.checkpoint: KIVI decode_cache=temp keeps what follows exact
        return self._snapshot(kv=rewrites or not kvc.crop_is_exact(self._attn_view()))

    def rollback(self, token):
        self._restore(token)
        self.marks = []

    def drop_last(self, n):
        self._drop_last(n)
        kvc.thaw(self.cache)  # as HFSession.drop_last: the next prompt is compressed as usual again

    @torch.inference_mode()
    def _drop_last(self, n):
        if n <= 0:
            return
        target = self.pos - n
        mark = next((m for m in reversed(self.marks) if m[0] <= target), None)
        if mark is None:
            raise RuntimeError(
                f"cannot drop the last {n} tokens: a recurrent state cannot be cropped, and no snapshot lies at or "
                f"before position {target} (marks at {[m[0] for m in self.marks]}; a feed is marked {TAIL} tokens "
                "before its end unless a method compressed or sparsified it)"
            )
        replay = self.ids[mark[0] : target]
        self._restore(mark)
        self.marks = [m for m in self.marks if m[0] <= target]
        if replay:
            _sync(self.engine.device)
            t0 = time.perf_counter()
            self._forward(replay)
            _sync(self.engine.device)
            self._replay_s += time.perf_counter() - t0
            self._replayed += len(replay)
            self.last_logits = None

    # --- accounting ---------------------------------------------------------------------------------
    def memory(self):
        view = self._attn_view()
        return {
            "kv_bytes": kvc.kv_nbytes(view),
            "kv_tokens": max(kvc.layer_lengths(view), default=0),
            "kv_full_bytes": self.token_bytes * self.pos,
            "state_bytes": sum(_nbytes(vars(self.cache.layers[i]).get(name)) for i in self.linear
                               for name in ("conv_states", "recurrent_states")),
            "slow_tier_bytes": 0,
            "loaded_bytes": 0,
            "peak_mem_bytes": self.engine.peak_memory(),
        }
