"""The attention function scbench registers with transformers, and its plain causal reference.

transformers calls ``scbench_attention`` for every attention layer (``attn_implementation="scbench"``).
It is dense SDPA with a bottom-right-aligned causal mask, so it stays correct when layers hold caches
of different lengths after eviction (the library's shared mask assumes one length). While a session
forwards tokens it installs an ``AttnContext`` that lets the active method see the prefill queries
(``query_window``) and replace the prefill attention (``prefill_attention``).
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NAME = "scbench"
# Decode (one query) avoids the cuDNN backend: measured on an H100, cuDNN SDPA re-plans whenever the key length
# changes, which every decode step does (per-layer lengths under PyramidKV dropped decode to 0.5 tok/s).
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttnContext:
    method: object | None = None
    sparse: bool = False
    """Route multi-token forwards through ``method.prefill_attention``."""
    capture_queries: int = 0
    """Keep the last N queries of each layer in ``queries`` (for query-aware compression)."""
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    cells_total: int = 0
    """Causal attention score cells of the multi-token forwards (batch x query heads x layers)."""
    cells_computed: int = 0
    """Of those, the cells computed: dense forwards count all, a sparse hook reports its own."""
    reported: bool = False
    """Set by ``count_computed`` during a hook call."""
    decode: bool = False
    """Route one-query forwards through ``method.decode_attention`` (retrieval / loading methods)."""
    cache: object | None = None
    """The session's cache, so a decode hook can reach its layer (e.g. a ``TieredLayer`` that loads rows)."""
    rolling: bool = False
    """With ``capture_queries``: one-query (decode) forwards append their queries too (compression during decode)."""
    static: object | None = None
    """Fast decode (scbench/engines/fastdecode.py): a ``StaticKV`` whose ``attend`` masks its pre-allocated buffers."""


_ACTIVE: ContextVar[AttnContext | None] = ContextVar("scbench_attn", default=None)


@contextlib.contextmanager
def active(ctx: AttnContext):
    token = _ACTIVE.set(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)


def count_computed(cells: int) -> None:
    """Called by a sparse prefill hook: the score cells it computed in this call (all heads and batch rows)."""
    ctx = _ACTIVE.get()
    if ctx is not None:
        ctx.cells_computed += int(cells)
        ctx.reported = True


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense causal attention, queries aligned to the end of the keys.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] with Tk >= Tq and Hq a multiple of Hkv -> [B, Hq, Tq, D].
    """
    tq, tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if tq == 1:
        if q.is_cuda:  # cuDNN re-plans for every new key length: decode lengths change each step
            with sdpa_kernel(DECODE_BACKENDS):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def reference_causal_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """Plain float64 softmax(QK^T)V with an explicit mask; the yardstick for every fast path."""
    tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).double()
    v = v.repeat_interleave(rep, dim=1).double()
    scores = (q.double() @ k.transpose(-1, -2)) * (scale if scale is not None else d**-0.5)
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def scbench_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention-interface entry: query [B,Hq,T,D], key/value [B,Hkv,S,D] -> ([B,T,Hq,D], None)."""
    ctx = _ACTIVE.get()
    layer = getattr(module, "layer_idx", 0)
    out = None
    ragged = getattr(key, "scbench_ragged", None)  # a RaggedLayer's keys: per-head lengths (scbench/kv/ragged.py)
    if ctx is not None:
        if ctx.capture_queries and (query.shape[-2] > 1 or ctx.rolling):
            q = query[:, :, -ctx.capture_queries :, :].detach().clone()  # own storage, not a view
            if ctx.rolling and layer in ctx.queries:  # decode: keep the last capture_queries one-token queries
                q = torch.cat([ctx.queries[layer], q], dim=-2)[:, :, -ctx.capture_queries :, :]
            ctx.queries[layer] = q
        if query.shape[-2] > 1:
            tq, tk = query.shape[-2], key.shape[-2]
            dense = (tq * (tk - tq) + tq * (tq + 1) // 2) * query.shape[0] * query.shape[1]
            ctx.cells_total += dense
            ctx.reported = False
            if ctx.sparse and ragged is None:
                out = ctx.method.prefill_attention(layer, query, key, value, scaling)
            if not ctx.reported:
                ctx.cells_computed += dense
        elif ctx.decode and ragged is None:
            cache_layer = ctx.cache.layers[layer] if ctx.cache is not None else None
            out = ctx.method.decode_attention(layer, query, key, value, scaling, layer=cache_layer)
    if out is None and ragged is not None:
        from scbench.kv.ragged import ragged_attention

        out = ragged_attention(query, ragged, scaling)
    if out is None and ctx is not None and ctx.static is not None:
        out = ctx.static.attend(layer, query, key, value, scaling)
    if out is None:
        out = causal_attention(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, scbench_attention)
