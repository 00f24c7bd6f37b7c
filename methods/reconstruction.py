"""KVzip's importance scores: the attention each cached KV pair receives while the model repeats the context.

Used by ``scbench.methods.kvzip``. The tokens of a compressing feed are cut into chunks of ``chunk`` tokens; for
chunk i the model forwards, on top of the session's cache, the repeat prompt of the KVzip paper ("Repeat the
previous context exactly." for the first chunk, "Repeat the part of the previous context exactly, starting with"
+ the last 8 tokens of the previous chunk for the others), the chat template's turn switch, then the chunk itself.
Those queries' post-RoPE projections are captured, and each KV pair of the chunk gets the maximum, over the
queries and over the query heads of its KV group, of its softmax attention weight, the softmax running over the
sinks, the chunk's own KV pairs and the repeat (as the reference implementation subsamples the keys). The repeat
tokens are then dropped from the cache again. Memory is bounded by the chunk, not the context: one chunk's queries
per layer, the repeat forward's attention over the cache on the dense kernel (CUDA: cuDNN over the context plus
cuDNN causal over the repeat, merged by log-sum-exp, ``dense.split_prefix``; flash over ragged heads), and on CUDA
two fused Triton passes for the scores (``scbench.kernels.h2o_scores`` with a max reduction: each repeat query's
log-sum-exp over the scored keys, then each key's largest exp(score - lse); no weight block), elsewhere (and as the
reference) [heads, group, rows, sinks + chunk + repeat] float32 weight blocks of at most ``block_bytes`` (a layer's
KV heads scored together, in blocks of heads and repeat queries). H200, 131K, one layer's chunk: scores 4.02 ->
0.35 ms, repeat attention 15.6 -> 8.1 ms (results/perf/kvzip_duo_h200.md).
"""
from __future__ import annotations

import contextlib
import os

import torch

from scbench.engines import attention
from scbench.kernels import dense, h2o_scores

KERNEL = os.environ.get("SCBENCH_KVZIP_KERNEL", "1") != "0"
"""CUDA: the scores through the fused Triton passes (``SCBENCH_KVZIP_KERNEL=0``: the torch blocks, the reference)."""
SPLIT_PREFIX = os.environ.get("SCBENCH_KVZIP_SPLIT", "1") != "0"
"""CUDA: the repeat forwards' attention as cuDNN over the context plus cuDNN causal over the repeat, merged
(``scbench.kernels.dense.split_prefix``; ``SCBENCH_KVZIP_SPLIT=0``: flash with a lower-right bias)."""

SPLIT_MIN_KEYS = 16384
"""Shortest cache the split attention is used over (below, the cuDNN plans of the chunk shapes cost more than the
split saves over flash)."""

FIRST = "\n\nRepeat the previous context exactly."
LATER = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8
"""Tokens of the previous chunk quoted in a later chunk's repeat prompt."""


def turn_switch(engine) -> list[int]:
    """Token ids that close the user turn and open the assistant's (the chat template's), or a newline."""
    try:
        sep = "\n" + "#" * 13
        text = engine.render_chat([{"role": "user", "content": "dummy context" + sep}], add_generation_prompt=True)
        suffix = text.split(sep)[1]
    except (ValueError, IndexError):
        suffix = "\n"
    return engine.encode(suffix, add_special_tokens=False)


def repeat_prompts(engine, ids: list[int], chunk: int) -> list[tuple[int, int, list[int]]]:
    """(start, end, repeat ids) per chunk of ``ids``."""
    switch = turn_switch(engine)
    first, later = engine.encode(FIRST, add_special_tokens=False), engine.encode(LATER, add_special_tokens=False)
    out = []
    for a in range(0, len(ids), chunk):
        b = min(len(ids), a + chunk)
        head = first if a == 0 else later + ids[max(0, a - OVERLAP) : a]
        out.append((a, b, head + switch + ids[a:b]))
    return out


SCORE_BLOCK_BYTES = 1 << 29
"""Largest float32 weight block the scoring materialises on an accelerator ([heads, group, rows, keys], blocks of
KV heads and of repeat queries): bounded whatever the context (the keys are the sinks, the chunk and the repeat)."""
CPU_BLOCK_BYTES = 1 << 20
"""The same on the CPU: blocks that stay in cache (one chunk of 1,054 queries x 2 heads, 5K keys: 118 ms with
512 MiB blocks, 37 ms with 1 MiB)."""


def block_bytes(device) -> int:
    return CPU_BLOCK_BYTES if torch.device(device).type == "cpu" else SCORE_BLOCK_BYTES


def layer_scores(q: torch.Tensor, k: torch.Tensor, sink: int, start: int, end: int,
                 max_bytes: int | None = None, kernel: bool | None = None) -> torch.Tensor:
    """Max softmax weight each key of [start, end) receives from the repeat queries, for H KV heads at once.

    q: [H, g, r, D] (each KV head's group of repeat queries, post-RoPE); k: [H, n + r, D] (the heads' caches, repeat
    last) -> [H, end - start] float32. The softmax runs over keys [0, min(sink, start)), [start, end) and the r
    repeat keys (causal). Computed in blocks of heads and query rows (exact: each query's softmax is its own row)
    so that one weight block holds at most ``max_bytes`` (None: ``block_bytes`` of the device).

    ``kernel`` (None: on CUDA when Triton is there and ``KERNEL``): the two fused passes of
    ``scbench.kernels.h2o_scores`` (each repeat query's log-sum-exp over its visible keys, then the maximum of
    exp(score - lse) per key), bf16 products in float32, never a weight block; otherwise the torch blocks (float32,
    the reference)."""
    if kernel is None:
        kernel = k.is_cuda and KERNEL and h2o_scores.triton is not None
    if kernel:
        return fused_layer_scores(q, k, sink, start, end)
    nh, g, r, d = q.shape
    max_bytes = block_bytes(k.device) if max_bytes is None else max_bytes
    s = min(sink, start)
    keys = torch.cat([k[:, :s], k[:, start:end], k[:, k.shape[1] - r :]], dim=1).float()  # [H, m, D]
    m = keys.shape[1]
    c = m - r  # sinks + chunk: every repeat query sees them; the repeat keys are causal
    qs = q.float() * d**-0.5
    row_bytes = g * m * 4
    heads = max(1, min(nh, max_bytes // max(1, row_bytes * r)))
    rows = r if heads > 1 or row_bytes * r <= max_bytes else max(1, max_bytes // row_bytes)
    best = torch.zeros(nh, end - start, dtype=torch.float32, device=k.device)
    for h0 in range(0, nh, heads):
        h1 = min(nh, h0 + heads)
        kt = keys[h0:h1].transpose(-1, -2)  # [hb, D, m]
        for a in range(0, r, rows):
            b = min(r, a + rows)
            qb = qs[h0:h1, :, a:b].reshape(h1 - h0, g * (b - a), d)
            logits = torch.bmm(qb, kt).view(h1 - h0, g, b - a, m)
            future = torch.ones(b - a, r, dtype=torch.bool, device=k.device).triu(a + 1)
            logits[..., c:].masked_fill_(future, float("-inf"))
            w = logits.softmax(-1)
            del logits
            torch.maximum(best[h0:h1], w[..., s : s + end - start].amax(dim=(1, 2)), out=best[h0:h1])
    return best


def fused_layer_scores(q: torch.Tensor, k: torch.Tensor, sink: int, start: int, end: int) -> torch.Tensor:
    """``layer_scores`` through the Triton passes: the scored keys (sinks, chunk, repeat) gathered once ([H, m, D],
    the cache's dtype: a few MiB), the repeat queries as the last r positions of that sequence (bottom-right
    causal, as in the torch blocks); only the sink and chunk columns are scored."""
    nh, g, r, d = q.shape
    s = min(sink, start)
    keys = torch.cat([k[:, :s], k[:, start:end], k[:, k.shape[1] - r :]], dim=1)
    c = s + end - start
    out = h2o_scores.accumulated_attention_triton(keys[None], q.reshape(1, nh * g, r, d), scale=d**-0.5,
                                                  reduce="max", ncols=c)
    return out[0, :, s:c]


def chunk_scores(q: torch.Tensor, k: torch.Tensor, sink: int, start: int, end: int,
                 max_bytes: int | None = None, kernel: bool | None = None) -> torch.Tensor:
    """``layer_scores`` for one KV head: q [g, r, D]; k [n + r, D] -> [end - start] float32."""
    return layer_scores(q[None], k[None], sink, start, end, max_bytes, kernel)[0]


def head_keys(layer, h: int) -> torch.Tensor:
    """Head h's keys [n_h, D] (a plain layer or a ``RaggedLayer``)."""
    return layer.head(h)[0] if getattr(layer, "scbench_ragged", False) else layer.keys[0, h]


@torch.inference_mode()
def reconstruction_scores(session, ids: list[int], chunk: int, sink: int, max_bytes: int | None = None
                          ) -> tuple[dict[int, list[torch.Tensor]], int]:
    """Per layer, per KV head: a score for every cached token ([n_h] float32). The tokens of ``ids`` (the last
    len(ids) of every head) get their reconstruction scores (softmax weights, <= 1); the first ``sink`` tokens get
    +inf; earlier tokens (kept by an earlier firing) get 2 + position / n: kept before any new token, the most
    recent first when they alone exceed the budget. Also returns the repeat tokens forwarded. A dense layer's
    heads are scored together (``layer_scores``), a ragged layer's one by one (their lengths differ)."""
    cache = session.cache
    layers = [i for i, layer in enumerate(cache.layers) if layer.is_initialized]
    if cache.layers[layers[0]].keys.shape[0] != 1:
        raise ValueError("KVzip scores one sequence at a time (batch 1)")
    scores: dict[int, list[torch.Tensor]] = {}
    for i in layers:
        layer = cache.layers[i]
        hkv = len(layer.lengths) if getattr(layer, "scbench_ragged", False) else layer.keys.shape[1]
        scores[i] = []
        for h in range(hkv):
            n = head_keys(layer, h).shape[0]
            s = 2.0 + torch.arange(n, device=layer.keys.device) / n  # earlier tokens: above any weight, recent first
            s[:sink] = float("inf")
            s[max(sink, n - len(ids)) :] = 0.0
            scores[i].append(s)
    last_logits = session.last_logits  # the feed's logits: generation continues from them afterwards
    # cuDNN plans per shape: a dense cache gives a few (every chunk over the same context), ragged heads one per head
    # (H200: ~0.2 s per new chunk shape, 2-3 shapes per context; 7.5 ms saved per layer and chunk at 131K): only
    # over contexts of at least SPLIT_MIN_KEYS
    split = SPLIT_PREFIX and not any(getattr(cache.layers[i], "scbench_ragged", False) for i in layers) \
        and min(head_keys(cache.layers[i], 0).shape[0] for i in layers) >= SPLIT_MIN_KEYS
    forwarded = 0
    for a, b, rep in repeat_prompts(session.engine, ids, chunk):
        forwarded += len(rep)
        ctx = attention.AttnContext(capture_queries=len(rep))
        with dense.split_prefix() if split else contextlib.nullcontext():
            session._forward(rep, ctx)
        for i in layers:
            layer, q = cache.layers[i], ctx.queries[i][0]  # [Hq, r, D]
            hkv = len(scores[i])
            g = q.shape[0] // hkv
            if not getattr(layer, "scbench_ragged", False):  # every head holds the same positions
                off = scores[i][0].shape[0] - len(ids)
                lo, hi = max(off + a, sink), off + b
                if hi > lo:
                    out = layer_scores(q.view(hkv, g, *q.shape[1:]), layer.keys[0], sink, lo, hi, max_bytes)
                    for s, o in zip(scores[i], out):
                        s[lo:hi] = o
                continue
            for h, s in enumerate(scores[i]):
                off = s.shape[0] - len(ids)  # where ids start in this head
                lo, hi = max(off + a, sink), off + b
                if hi > lo:
                    s[lo:hi] = chunk_scores(q[h * g : (h + 1) * g], head_keys(layer, h), sink, lo, hi, max_bytes)
        session.drop_last(len(rep))
    session.last_logits = last_logits
    return scores, forwarded


def reference_chunk_scores(q, k, sink, start, end):
    """float64 loop version of ``chunk_scores`` (one query and one head at a time) for the tests."""
    r, d = q.shape[1], q.shape[-1]
    s = min(sink, start)
    cols = list(range(s)) + list(range(start, end)) + list(range(k.shape[0] - r, k.shape[0]))
    best = torch.zeros(end - start, dtype=torch.float64)
    for g in range(q.shape[0]):
        for t in range(r):
            visible = cols[: len(cols) - r + t + 1]
            w = ((k[visible].double() @ q[g, t].double()) * d**-0.5).softmax(0)
            best = torch.maximum(best, w[s : s + end - start])
    return best.float()
