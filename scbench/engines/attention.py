"""The attention function scbench registers with transformers (its dense path: scbench/kernels/dense.py).

transformers calls ``scbench_attention`` for every attention layer (``attn_implementation="scbench"``).
It is dense SDPA with a bottom-right-aligned causal mask, so it stays correct when layers hold caches
of different lengths after eviction (the library's shared mask assumes one length). While a session
forwards tokens it installs an ``AttnContext`` that lets the active method see the prefill queries
(``query_window``) and replace the prefill attention (``prefill_attention``).
"""
from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from scbench.kernels.dense import causal_attention, causal_attention_lse, reference_causal_attention  # noqa: F401 - tests and scripts use both here

NAME = "scbench"


@dataclass
class AttnContext:
    """What one forward lets ``scbench_attention`` do, set by the engine's session before the forward.

    Method hooks never receive the context: ``scbench_attention`` reads it and hands each hook what it may see.

    - ``prefill_attention(layer, q, k, v, scale)`` (when ``sparse``): only its arguments; it may report the
      score cells it computed through ``count_computed`` (which updates ``cells_computed`` / ``reported``).
    - ``decode_attention(layer, q, k, v, scale, layer=...)`` (when ``decode``): its arguments, ``layer`` being
      ``cache.layers[layer_idx]``; nothing else of the context.
    - ``compress_cache(layer, keys, values, queries)``: runs after the forward, outside the context; the engine
      passes ``queries[layer]`` (the last ``capture_queries`` queries, kept when ``capture_queries`` > 0).

    The engine reads back ``queries`` (for compression) and ``cells_total`` / ``cells_computed`` (the turn's
    ``attn_density``); ``static`` belongs to the fast decode path alone.
    """

    method: object | None = None
    """The method whose hooks the forward calls (None: plain dense attention). Read by scbench_attention only."""
    sparse: bool = False
    """Route multi-token forwards through ``method.prefill_attention``. Set by the engine."""
    capture_queries: int = 0
    """Keep the last N queries of each layer in ``queries`` (for query-aware compression). Set by the engine."""
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    """Layer -> its captured queries [B, Hq, N, D]; written by scbench_attention, read by the engine's compression
    pass (each ``compress_cache`` call gets its layer's entry)."""
    cells_total: int = 0
    """Causal attention score cells of the multi-token forwards (batch x query heads x layers). Written by
    scbench_attention, read by the engine."""
    cells_computed: int = 0
    """Of those, the cells computed: dense forwards count all, a sparse hook reports its own through
    ``count_computed``. Read by the engine."""
    reported: bool = False
    """Set by ``count_computed`` during a hook call; internal to scbench_attention."""
    decode: bool = False
    """Route one-query forwards through ``method.decode_attention`` (retrieval / loading methods). Set by the engine."""
    cache: object | None = None
    """The session's cache; scbench_attention passes a decode hook its layer (e.g. a ``TieredLayer`` that loads
    rows) as the ``layer`` argument. Set by the engine with ``decode``."""
    rolling: bool = False
    """With ``capture_queries``: one-query (decode) forwards append their queries too (compression during decode).
    Set by the engine."""
    static: object | None = None
    """Fast decode (scbench/engines/fastdecode.py): a ``StaticKV`` whose ``attend`` masks its pre-allocated buffers.
    Set and read by the fast decode path only; no hook sees it."""
    score_in_forward: bool = False
    """With ``capture_queries``: instead of keeping a multi-token forward's queries, score each layer as the forward
    reaches it (``method.forward_scores(layer, keys, queries)``, the layer's keys being every key the compression
    will see) and keep only the scores, summed over the feed's chunks in ``scores``: H2O's every prompt query was
    32 GiB at 131K on the 8B shape, held until the compression after the forward. Set by the engine (plain feeds of
    a method whose ``scores_in_forward()`` is true)."""
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    """Layer -> the scores computed in the forward with ``score_in_forward`` [B, Hkv, n]; read by the engine."""
    score_timers: list = field(default_factory=list)
    """The in-forward scoring's timings (CUDA event pairs, or seconds on other devices): ``score_seconds``."""
    lse: bool = False
    """Attach each captured query's log-sum-exp (``queries[layer].scbench_lse``) where the forward gets it for free,
    even when ``method`` does not ask for it (``Method.query_lse``): a shared prefill (scbench/engines/fork.py)
    whose group holds a method that does. Set by the engine."""

    def score_seconds(self) -> float:
        """Seconds the in-forward scoring took (``score_in_forward``); on CUDA read from events, so call it after a
        synchronisation."""
        total = 0.0
        for t in self.score_timers:
            total += t[0].elapsed_time(t[1]) / 1000.0 if isinstance(t, tuple) else t
        return total


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


def scored_queries(scores: torch.Tensor) -> torch.Tensor:
    """What a compression hook gets as a layer's ``queries`` when they were scored in the forward: an empty tensor
    carrying the scores [B, Hkv, n] as ``scbench_scores`` (``Method.scores_in_forward``)."""
    marker = scores.new_empty(0)
    marker.scbench_scores = scores
    return marker


def _score_layer(ctx: AttnContext, layer: int, query: torch.Tensor, key: torch.Tensor, lse) -> None:
    """``score_in_forward``: this forward's queries scored against the layer's keys, added to ``ctx.scores``."""
    q = query.detach().clone(memory_format=torch.contiguous_format)  # the captured queries' layout, one layer's
    if lse is not None and lse.shape == q.shape[:3]:
        q.scbench_lse = (lse, key.shape[-2])
    cuda = q.is_cuda
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    s = ctx.method.forward_scores(layer, key, q)
    del q
    prev = ctx.scores.get(layer)
    if prev is not None:  # an earlier chunk's queries (their keys: the first prev.shape[-1])
        s[..., : prev.shape[-1]] += prev
    ctx.scores[layer] = s
    if cuda:
        end.record()
        ctx.score_timers.append((start, end))
    else:
        ctx.score_timers.append(time.perf_counter() - t0)


def scbench_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention-interface entry: query [B,Hq,T,D], key/value [B,Hkv,S,D] -> ([B,T,Hq,D], None)."""
    ctx = _ACTIVE.get()
    layer = getattr(module, "layer_idx", 0)
    out = None
    ragged = getattr(key, "scbench_ragged", None)  # a RaggedLayer's keys: per-head lengths (scbench/kv/ragged.py)
    eager = ctx is not None and ctx.score_in_forward and ctx.capture_queries and query.shape[-2] > 1
    if ctx is not None:
        if ctx.capture_queries and (query.shape[-2] > 1 or ctx.rolling) and not eager:
            # own storage, not a view, and contiguous: the projection's transposed layout would make every reader
            # that wants it contiguous copy it (a grouped sweep's H2O fork: 34 GB of queries at 131K)
            q = query[:, :, -ctx.capture_queries :, :].detach().clone(memory_format=torch.contiguous_format)
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
    # e.g. H2O (or a shared prefill whose group holds it): the forward's log-sum-exp rides on the captured queries
    if out is None and ctx is not None and ctx.capture_queries and query.shape[-2] > 1 and ctx.method is not None \
            and (ctx.lse or getattr(ctx.method, "query_lse", False)):
        out, lse = causal_attention_lse(query, key, value, scaling)
        q = ctx.queries.get(layer)
        if eager:
            _score_layer(ctx, layer, query, key, lse)
            eager = False
        elif lse is not None and q is not None and q.shape[-2] <= query.shape[-2]:  # this forward's queries only
            q.scbench_lse = (lse[:, :, -q.shape[-2] :], key.shape[-2])
    if eager:  # the attention came from elsewhere: the scores need one more pass for their log-sum-exps
        _score_layer(ctx, layer, query, key, None)
    if out is None:
        out = causal_attention(query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, scbench_attention)
