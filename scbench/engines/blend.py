"""Blended prefill on the transformers engine: CacheBlend-style reuse of independently computed chunk KV.

Based on Yao et al., "CacheBlend: Fast Large Language Model Serving for RAG with Cached Knowledge Fusion"
(arXiv 2405.16444). The prompt (all but its last token) is cut into chunks whose KV is computed alone, each from
position 0 or after a shared prefix, as a KV store would hold it. At request time the chunk KV is concatenated,
keys are re-rotated to their true positions (RoPE is a rotation, so R(t) k = R(t - s) R(s) k), and the model
runs layer by layer over the blended cache: layers up to ``select_layer`` recompute every token, the value
deviation between fresh and stored KV at ``select_layer`` picks the top ``ratio`` tokens, and the deeper layers
recompute only those (plus the last token, whose logits start generation), attending causally over the blended
cache of each layer with their own fresh KV scattered in. Llama-family decoders (rotate-half RoPE).
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

from scbench.devices import sync as _sync
from scbench.engines import attention, mlp_rows
from scbench.engines.base import FeedStats, cache_kw
from scbench.kernels.dense import prefix_rows

EXACT_ROPE = ("default", "linear", "llama3", "yarn")
"""RoPE types whose frequencies do not depend on the sequence length: re-rotation is exact for them."""


def decoder_parts(model):
    """(base model, decoder layers) of a Llama-family causal LM, or a ValueError naming what is missing."""
    base = getattr(model, "model", None)
    missing = [a for a in ("embed_tokens", "layers", "rotary_emb", "norm") if not hasattr(base, a)]
    if base is None or missing or not hasattr(model, "lm_head"):
        raise ValueError(
            f"blended prefill needs a Llama-family decoder (model.model with embed_tokens, layers, rotary_emb, norm and "
            f"a lm_head); {type(model).__name__} lacks {', '.join(missing) or 'lm_head'}"
        )
    rope = getattr(base.rotary_emb, "rope_type", "default")
    if rope not in EXACT_ROPE:
        raise ValueError(f"blended prefill re-rotates keys, which is exact only for RoPE types {EXACT_ROPE}; got {rope!r}")
    return base, base.layers[: model.config.num_hidden_layers]


def rerotate(keys: torch.Tensor, shift: torch.Tensor, rotary) -> torch.Tensor:
    """Move post-RoPE keys by ``shift`` positions: keys [B, H, T, D], shift [T] (int) -> [B, H, T, D].

    Multiplying by the rotation of angle shift * theta_i turns a key rotated for position s into the key for
    position s + shift. Computed in float32; the rotary module's attention scaling (YaRN) is divided out, since
    the stored keys already carry it.
    """
    x = keys.float()
    cos, sin = rotary(x, shift[None].to(keys.device))
    scale = getattr(rotary, "attention_scaling", 1.0)
    cos, sin = (cos / scale)[:, None], (sin / scale)[:, None]  # [1, 1, T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(keys.dtype)


def chunk_spans(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive chunks covering n tokens."""
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


BATCH_TOKENS = int(os.environ.get("SCBENCH_BLEND_BATCH_TOKENS", "16384"))
"""Tokens per forward when ``chunk_kv`` computes chunks of the same length as one batch (each row one chunk from
position 0, alone: the KV a store would hold); 0 computes them one by one (``chunk_kv_loop``, the reference).
One forward of 256 tokens per chunk was 512 forwards at 131K (~48 ms each on the H200 at 32K, the likely bulk of the
first turn's ~6 s chunk-KV time there, results/perf/cacheblend_h200.md)."""


@torch.inference_mode()
def chunk_kv(model, ids: list[int], chunk_size: int, prefix: int, batch_tokens: int | None = None,
             room: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys and values of ``ids`` computed chunk by chunk, each chunk alone (after ``ids[:prefix]`` for chunks
    past the first) and re-rotated to its true positions: per layer [1, kv_heads, len(ids) + room, head_dim], the
    ``room`` last positions zero (``blended_forward`` fills the new token's there). Each group's rows are written
    straight into the layer's buffer: no list of pieces concatenated at the end (which held the chunk KV twice,
    ~16 GB more at 131K for Llama-3.1-8B).

    Chunks whose input (prefix + chunk) has the same length run as the rows of one forward of at most
    ``batch_tokens`` tokens (default ``BATCH_TOKENS``; 0: ``chunk_kv_loop``, one forward per chunk), and each layer's
    keys are re-rotated once for every chunk. A row attends only to its own tokens (a causal batch without padding),
    so the rows are the chunks computed alone; tests/methods/test_cacheblend.py compares the two on random tokens."""
    batch_tokens = BATCH_TOKENS if batch_tokens is None else batch_tokens
    if batch_tokens <= 0:
        return chunk_kv_loop(model, ids, chunk_size, prefix)
    from transformers import DynamicCache

    base, layers = decoder_parts(model)
    dev = next(model.parameters()).device
    spans = chunk_spans(len(ids), chunk_size)
    groups: list[list[tuple[int, int]]] = []  # consecutive chunks of one input length, at most batch_tokens a group
    for s, e in spans:
        length = _input_len((s, e), prefix, len(ids))
        g = groups[-1] if groups else None
        if (g is not None and (g[0][0] > 0) == (s > 0) and _input_len(g[0], prefix, len(ids)) == length
                and (len(g) + 1) * length <= max(batch_tokens, length)):
            g.append((s, e))  # the same input length, and the prefix before every chunk of the group or none
        else:
            groups.append([(s, e)])
    keys: list[torch.Tensor | None] = [None] * len(layers)
    values: list[torch.Tensor | None] = [None] * len(layers)
    for g in groups:
        s0, s1 = g[0][0], g[-1][1]
        head = ids[:prefix] if s0 > 0 else []
        inp = torch.tensor([head + ids[s:e] for s, e in g], device=dev)  # [chunks, len(head) + chunk]
        cache = DynamicCache(config=model.config)
        model(input_ids=inp, position_ids=torch.arange(inp.shape[1], device=dev)[None].expand(len(g), -1),
              **{cache_kw(model): cache}, use_cache=True, logits_to_keep=1)
        shift = torch.cat([torch.full((e - s,), s - len(head), dtype=torch.long) for s, e in g])
        still = shift == 0  # chunks already at their true positions keep their keys as computed (decided on the host)
        moved = not bool(still.all())
        still = still.to(dev)[:, None] if moved else None
        for i, layer in enumerate(cache.layers[: len(layers)]):
            k, v = (_rows_in_order(x[:, :, len(head):]) for x in (layer.keys, layer.values))
            if moved:
                k = torch.where(still, k, rerotate(k, shift, base.rotary_emb))
            if keys[i] is None:
                keys[i], values[i] = (_buffer(x, len(ids) + room) for x in (k, v))
            keys[i][:, :, s0:s1] = k
            values[i][:, :, s0:s1] = v
        del cache
    return keys, values


def _buffer(like: torch.Tensor, n: int) -> torch.Tensor:
    """[1, H, n, D] in ``like``'s dtype and device, to be written position by position (zeros past what is)."""
    return torch.zeros(1, like.shape[1], n, like.shape[3], dtype=like.dtype, device=like.device)


def _input_len(span: tuple[int, int], prefix: int, n: int) -> int:
    s, e = span
    return (e - s) + (min(prefix, n) if s > 0 else 0)


def _rows_in_order(x: torch.Tensor) -> torch.Tensor:
    """[chunks, H, T, D] (one chunk a row) -> [1, H, chunks * T, D], the chunks one after another."""
    c, h, t, d = x.shape
    return x.permute(1, 0, 2, 3).reshape(1, h, c * t, d) if c > 1 else x


@torch.inference_mode()
def chunk_kv_loop(model, ids: list[int], chunk_size: int, prefix: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``chunk_kv`` one forward per chunk (the reference of its batched form; ``SCBENCH_BLEND_BATCH_TOKENS=0``)."""
    from transformers import DynamicCache

    base, layers = decoder_parts(model)
    dev = next(model.parameters()).device
    keys: list[list[torch.Tensor]] = [[] for _ in layers]
    values: list[list[torch.Tensor]] = [[] for _ in layers]
    for s, e in chunk_spans(len(ids), chunk_size):
        head = ids[:prefix] if s > 0 else []
        inp = torch.tensor([head + ids[s:e]], device=dev)
        cache = DynamicCache(config=model.config)
        model(input_ids=inp, position_ids=torch.arange(inp.shape[1], device=dev)[None], **{cache_kw(model): cache},
              use_cache=True, logits_to_keep=1)
        shift = torch.full((e - s,), s - len(head), dtype=torch.long)
        for i, layer in enumerate(cache.layers[: len(layers)]):
            k, v = layer.keys[:, :, len(head):], layer.values[:, :, len(head):]
            keys[i].append(rerotate(k, shift, base.rotary_emb) if s - len(head) else k)
            values[i].append(v)
    return [torch.cat(k, dim=2) for k in keys], [torch.cat(v, dim=2) for v in values]


class _BlendedKV:
    """The cache the decoder layers see during the blended pass (duck-typed ``Cache.update``).

    With ``idx`` None a layer computed every position: its fresh KV replaces the stored one (layer ``keep``'s
    stored values are kept in ``stored`` for the deviation; the other full layers' are dropped). Otherwise the fresh
    KV of positions ``idx`` is scattered into the layer's blended KV, and the whole layer is returned for attention.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], keep: int | None = None):
        self.keys, self.values, self.keep = keys, values, keep
        self.idx: torch.Tensor | None = None
        self.stored: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.idx is None:
            if layer_idx == self.keep:
                self.stored[layer_idx] = self.values[layer_idx]
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        else:
            self.keys[layer_idx][:, :, self.idx] = key_states
            self.values[layer_idx][:, :, self.idx] = value_states
        return self.keys[layer_idx], self.values[layer_idx]


class _ScatteredQueries:
    """Attention for queries at positions ``idx`` (ascending) over all ``n`` keys: key j visible when j <= idx."""

    def __init__(self, idx: torch.Tensor, n: int):
        self.idx, self.n = idx, n
        self.mask = None  # CPU: [q, n], built once for every layer

    def prefill_attention(self, layer_idx, q, k, v, scale):
        """q: [B, Hq, len(idx), D]; k, v: [B, Hkv, n, D] -> [B, Hq, len(idx), D]. CUDA: in row blocks, memory-light
        (``dense.prefix_rows``: split from 80K keys, else masked, ``SCBENCH_PREFIX_ROWS``; one masked SDPA would hold
        [Hq, len(idx), n] float32 scores and copy the keys per query head: 330 GB at 131K). CPU: that one SDPA, as
        before (CPU results stay bit for bit)."""
        if q.is_cuda:
            return prefix_rows(q, k, v, self.idx, scale)
        if self.mask is None:
            self.mask = torch.arange(self.n, device=q.device)[None, :] <= self.idx[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])


def select_tokens(fresh: torch.Tensor, stored: torch.Tensor, ratio: float) -> torch.Tensor:
    """Positions (ascending) of the ceil(ratio * T) tokens whose values deviate most: [B, H, T, D] x2 -> [k]."""
    dev = (fresh.float() - stored.float()).pow(2).sum(dim=(0, 1, 3))
    k = min(dev.numel(), math.ceil(ratio * dev.numel()))
    return dev.topk(k).indices.sort().values


@torch.inference_mode()
def blended_forward(model, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor], *, ratio: float,
                    select_layer: int) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor, int]:
    """Selective recompute over stored KV of ``ids[:-1]`` (per layer [1, Hkv, n - 1, D], or [1, Hkv, n, D] with the
    last position's slot already there: ``chunk_kv(..., room=1)``); the last token is new. The lists are the blend's
    working buffers: their tensors are replaced (the caller's stored KV is not kept beside the blended one).

    Returns (logits of the last position [vocab], blended keys and values per layer [1, Hkv, n, D], the positions
    recomputed past ``select_layer`` [k], layers computed for every token).
    """
    base, layers = decoder_parts(model)
    dev = next(model.parameters()).device
    n = len(ids)
    if keys is values:
        raise ValueError("blended_forward: keys and values must be two lists (they are replaced layer by layer)")
    for kv_list in (keys, values):
        for i, x in enumerate(kv_list):
            if x.shape[2] == n - 1:  # the last token's slot, filled at every layer (one layer's copy at a time)
                kv_list[i] = torch.cat([x, torch.zeros_like(x[:, :, :1])], 2)
            elif x.shape[2] != n:
                raise ValueError(f"blended_forward: layer {i}'s stored KV has {x.shape[2]} positions; expected "
                                 f"{n - 1} (the prompt less its last token) or {n}")
    kv = _BlendedKV(keys, values, keep=select_layer if ratio > 0 else None)
    pos = torch.arange(n, device=dev)
    hidden = base.embed_tokens(torch.tensor([ids], device=dev))
    cos, sin = base.rotary_emb(hidden, pos[None])
    idx = pos if ratio > 0 else pos[-1:]
    full_layers = select_layer + 1 if ratio > 0 else 0
    if ratio == 0:
        hidden, cos, sin = hidden[:, idx], cos[:, idx], sin[:, idx]
    for i, layer in enumerate(layers):
        full = i < full_layers
        kv.idx = None if full else idx
        ctx = attention.AttnContext() if full else attention.AttnContext(method=_ScatteredQueries(idx, n), sparse=True)
        with attention.active(ctx):
            hidden = layer(hidden, position_embeddings=(cos, sin), position_ids=idx[None], **{cache_kw(layer): kv},
                           use_cache=True)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if full and i == select_layer:  # pick the tokens the deeper layers recompute
            picked = select_tokens(kv.values[i][:, :, : n - 1], kv.stored[i][:, :, : n - 1], ratio)
            kv.stored.clear()  # the select layer's replaced values: only the deviation needed them
            idx = torch.cat([picked, pos[-1:]])
            hidden, cos, sin = hidden[:, idx], cos[:, idx], sin[:, idx]
    logits = model.lm_head(base.norm(hidden[:, -1:]))[0, -1]
    return logits, kv.keys, kv.values, idx, full_layers


def blended_prefill(session, ids: list[int], *, chunk_size: int, ratio: float, select_layer: int, prefix: int,
                    measure_full: bool) -> tuple[FeedStats, dict]:
    """Fill an empty ``HFSession`` cache with the blended KV of ``ids`` and set its last logits.

    FeedStats.seconds is the request-time work (re-rotation is part of the chunk store here, so: the layered
    recompute and installing the cache). The dict next to it holds CacheBlend's cost columns: recompute_frac,
    chunk_kv_s and, with ``measure_full``, prefill_saved_s (a full prefill of the same tokens, timed on a throwaway
    cache, minus that time). That full prefill runs first, while the device holds no more than the weights, so its
    cache and activations are gone before the chunk KV and the blend: the blend's peak memory is its own (at 131K on
    Llama-3.1-8B the two together outgrew an 80 GB H100). On CUDA every forward's MLP runs in row blocks
    (``mlp_rows``).
    """
    with mlp_rows.rows(session.engine.model, len(ids)):  # the long forwards' MLPs in row blocks (CUDA)
        return _blended_prefill(session, ids, chunk_size=chunk_size, ratio=ratio, select_layer=select_layer,
                                prefix=prefix, measure_full=measure_full)


def _blended_prefill(session, ids, *, chunk_size, ratio, select_layer, prefix, measure_full):
    from transformers import DynamicCache

    engine, model = session.engine, session.engine.model
    dev = engine.device
    n = len(ids)
    layers = decoder_parts(model)[1]
    if not 0 <= select_layer < len(layers):
        raise ValueError(f"cacheblend select_layer {select_layer} is outside the model's {len(layers)} layers")
    full_s = None
    if measure_full:
        _sync(dev)
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids], device=dev), **{cache_kw(model): DynamicCache(config=model.config)},
                  use_cache=True, logits_to_keep=1)
        _sync(dev)
        full_s = time.perf_counter() - t
    else:
        _sync(dev)
    t0 = time.perf_counter()
    if n > 1:  # the blend's buffers with the last token's slot: no padded copy of the chunk KV
        keys, values = chunk_kv(model, ids[:-1], chunk_size, prefix, room=1)
    else:  # nothing to reuse
        empty = torch.zeros(1, engine.kv_heads, 0, engine.head_dim, dtype=engine.dtype, device=dev)
        keys, values = [empty] * len(layers), [empty] * len(layers)
    _sync(dev)
    t1 = time.perf_counter()
    logits, keys, values, idx, full_layers = blended_forward(model, ids, keys, values, ratio=ratio,
                                                             select_layer=select_layer)
    for i in range(len(keys)):  # the cache's update may copy (a cat onto an empty layer): drop each layer installed
        k, v = keys[i].contiguous(), values[i].contiguous()
        keys[i] = values[i] = None
        session.cache.update(k, v, i)
        del k, v
    session.pos = n
    session.last_logits = logits
    _sync(dev)
    seconds = time.perf_counter() - t1
    costs = {"recompute_frac": len(idx) / n, "chunk_kv_s": t1 - t0}
    if full_s is not None:
        costs["prefill_saved_s"] = full_s - seconds
    heads = model.config.num_attention_heads
    dense = n * (n + 1) // 2
    computed = full_layers * dense + (len(layers) - full_layers) * int((idx + 1).sum())
    return FeedStats(tokens=n, reused=0, seconds=seconds, attn_cells=heads * len(layers) * dense,
                     attn_computed=heads * computed), costs
