"""Dense causal attention with the queries aligned to the end of the keys, and its plain float64 reference.

The default path of scbench's attention function (scbench/engines/attention.py) and of the loading methods'
decode over the rows they load (scbench/kv/offload.py); bottom-right alignment keeps it correct when layers hold
caches of different lengths after eviction.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

# Decode (one query) avoids the cuDNN backend: measured on an H100, cuDNN SDPA re-plans whenever the key length
# changes, which every decode step does (per-layer lengths under PyramidKV dropped decode to 0.5 tok/s).
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
    if q.is_cuda:  # a later turn's prefill / a chunk over a cache: new (Tq, Tk) every turn and layer
        return _lower_right_cuda(q, k, v, scale, gqa)
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


MASKED_BLOCK_BYTES = 1 << 30
"""Largest float32 score block the masked fallback of ``_lower_right_cuda`` materialises (SDPA's math kernel keeps
[B, Hq, Tq, Tk] float32 intermediates: 32 GiB for 2,061 queries over 131K keys with 32 heads)."""


SPLIT_PREFIX = contextvars.ContextVar("scbench_split_prefix", default=False)
"""Set (``split_prefix()``) by callers whose chunks come over a cache of a fixed length (KVzip's reconstruction
forwards: every chunk over the same context): lower-right attention as the chunk over the cache (no mask) plus the
chunk's causal square, both on cuDNN (its plan is per shape: here a few shapes), merged by their log-sum-exps."""


@contextlib.contextmanager
def split_prefix():
    token = SPLIT_PREFIX.set(True)
    try:
        yield
    finally:
        SPLIT_PREFIX.reset(token)


def _cudnn_lse(q, k, v, causal: bool, scale):
    """cuDNN SDPA (top-left causal or none) and its natural log-sum-exp [B, Hq, Tq] float32."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                  scale=scale)[:2]
    return out, lse.squeeze(-1) if lse.dim() == 4 else lse


def prefix_split_cudnn(q, k, v, scale):
    """Lower-right causal attention of q [B, Hq, Tq, D] over k, v [B, Hkv, Tk, D] (Tk > Tq) as cuDNN over the
    first Tk - Tq keys (every query sees them) and cuDNN causal over the last Tq, merged exactly; None when cuDNN
    does not take the shapes."""
    tq, tk = q.shape[-2], k.shape[-2]
    p = tk - tq
    try:
        o1, l1 = _cudnn_lse(q, k[:, :, :p], v[:, :, :p], False, scale)
        o2, l2 = _cudnn_lse(q, k[:, :, p:], v[:, :, p:], True, scale)
    except RuntimeError:
        return None
    if l1.shape != q.shape[:3] or l2.shape != q.shape[:3]:
        return None
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    tot = w1 + w2
    return (o1.float() * (w1 / tot)[..., None] + o2.float() * (w2 / tot)[..., None]).to(q.dtype)


SPLIT_KV_ROWS = int(os.environ.get("SCBENCH_SPLIT_KV_ROWS", "0"))
"""A chunk of at most this many query rows over at least ``SPLIT_KV_MIN_KEYS`` keys (a later turn's prompt over its
context, a first turn's query fed after it) runs on CUDA as split-KV flash (``split_kv_lower_right``): one flash call
gives each head's few rows to one or two thread blocks that walk every key (32 programs for 64 rows of Llama-3.1-8B),
the split gives every segment of keys its own. 0 (the default): never, the one-call form. Measured slower on the
H200 (torch 2.11, Llama-3.1-8B heads, bf16, 131K keys, results/perf/query_chunk_h200.json): 50 rows 0.96 ms against
the one call's 0.60, 100 rows 1.01 against 0.94; ``SCBENCH_SPLIT_KV_ROWS=256`` turns it on."""
SPLIT_KV_MIN_KEYS = 16384
SPLIT_KV_SEGMENT = 4096


def attention_lse(q, k, v, causal: bool, scale: float | None = None):
    """Plain (out, natural log-sum-exp) of q [B, Hq, R, D] over k, v [B, Hkv, N, D] in float32, lower-right causal
    when ``causal``: the reference of a ``split_kv_lower_right`` part (CUDA: flash)."""
    hq, hk, r, n = q.shape[1], k.shape[1], q.shape[-2], k.shape[-2]
    kk, vv = (x.repeat_interleave(hq // hk, 1).float() for x in (k, v))
    s = (q.float() @ kk.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        s = s.masked_fill(~torch.ones(r, n, dtype=torch.bool, device=q.device).tril(n - r), float("-inf"))
    return (s.softmax(-1) @ vv).to(q.dtype), torch.logsumexp(s, -1)


def _flash_part(q, k, v, causal: bool, scale):
    """Flash (lower-right causal when ``causal``, GQA without copies) and its log-sum-exp; None when this build's
    flash does not take the shapes."""
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    except RuntimeError:
        return None
    r = q.shape[-2]
    if lse.dim() != 3 or lse.shape[:2] != q.shape[:2] or lse.shape[-1] < r:  # some builds pad the rows
        return None
    return out, lse[..., :r]


def split_kv_lower_right(q, k, v, scale=None, part=None, segment: int = SPLIT_KV_SEGMENT):
    """Lower-right causal attention of a few query rows q [1, Hq, R, D] over many keys k, v [1, Hkv, N, D], the keys
    in segments: the segments every row sees whole as one batched call without a mask (a batch entry per segment,
    views of the keys: nothing copied), the rest (the tail with the chunk's own keys) one lower-right causal call,
    merged exactly by their log-sum-exps. ``part(q, k, v, causal, scale) -> (out, lse) | None``: one call (default:
    flash, ``_flash_part``; the reference ``attention_lse``). None when a part returns None."""
    tq, tk = q.shape[-2], k.shape[-2]
    part = part or _flash_part
    n = (tk - tq) // segment
    outs, lses = [], []
    if n:
        kk, vv = (x[0, :, : n * segment].unflatten(1, (n, segment)).transpose(0, 1) for x in (k, v))
        r = part(q.expand(n, -1, -1, -1).contiguous(), kk, vv, False, scale)
        if r is None:
            return None
        outs.append(r[0])
        lses.append(r[1])
    r = part(q, k[:, :, n * segment :], v[:, :, n * segment :], True, scale)
    if r is None:
        return None
    outs.append(r[0])
    lses.append(r[1])
    out, lse = torch.cat(outs), torch.cat(lses).float()  # [S, Hq, R, D], [S, Hq, R]
    w = torch.softmax(lse, 0)[..., None]
    return (out.float() * w).sum(0, keepdim=True).to(q.dtype)


def _lower_right_cuda(q, k, v, scale, gqa):
    """Queries aligned to the end of the keys on CUDA. SDPA with a boolean mask cannot take the flash kernel (the
    only fused one with GQA) and falls to the math kernel, or to cuDNN, which re-plans for every new (Tq, Tk);
    torch's lower-right ``CausalBias`` runs flash without a mask (its causal flag is lower-right). Where flash does
    not take the shapes, the masked SDPA (cuDNN off) in query blocks of at most ``MASKED_BLOCK_BYTES`` scores."""
    tq, tk = q.shape[-2], k.shape[-2]
    if q.dtype in (torch.float16, torch.bfloat16) and SPLIT_PREFIX.get() and q.shape[-1] <= 256:
        out = prefix_split_cudnn(q, k, v, scale)
        if out is not None:
            return out
    if q.dtype in (torch.float16, torch.bfloat16) and 0 < tq <= SPLIT_KV_ROWS and tk >= SPLIT_KV_MIN_KEYS \
            and q.shape[-1] <= 256:
        outs = []
        for b in range(q.shape[0]):
            o = split_kv_lower_right(q[b : b + 1], k[b : b + 1], v[b : b + 1], scale)
            if o is None:
                break
            outs.append(o)
        else:
            return torch.cat(outs) if len(outs) > 1 else outs[0]
    if q.dtype in (torch.float16, torch.bfloat16):
        bias = causal_lower_right(tq, tk)
        for repeat in (False, True) if gqa else (False,):
            rep = q.shape[1] // k.shape[1] if repeat else 1  # a flash build without GQA: repeated keys
            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1) if repeat else k,
                                                          v.repeat_interleave(rep, 1) if repeat else v,
                                                          attn_mask=bias, scale=scale, enable_gqa=gqa and not repeat)
            except RuntimeError:  # no flash kernel for these shapes / this build: the next way
                continue
    return masked_blocks(q, k, v, scale, gqa, MASKED_BLOCK_BYTES)


def masked_blocks(q, k, v, scale, gqa, max_bytes: int) -> torch.Tensor:
    """Bottom-right causal SDPA over blocks of queries so that one block's float32 scores [B, Hq, rows, Tk] stay
    within ``max_bytes`` (exact: every query row is independent). cuDNN off (it re-plans per shape)."""
    b, hq, tq, _ = q.shape
    tk = k.shape[-2]
    rows = max(1, min(tq, max_bytes // max(1, b * hq * tk * 4)))
    outs = []
    for a in range(0, tq, rows):
        e = min(tq, a + rows)
        mask = torch.ones(e - a, tk, dtype=torch.bool, device=q.device).tril(tk - tq + a)
        ctx = sdpa_kernel(DECODE_BACKENDS) if q.is_cuda else contextlib.nullcontext()
        with ctx:
            outs.append(F.scaled_dot_product_attention(q[..., a:e, :], k, v, attn_mask=mask, scale=scale,
                                                       enable_gqa=gqa))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _row_ends(name: str, q, k, last) -> tuple[int, list[int]]:
    """(query heads per KV head, each row's key count ``last + 1`` read once to the host), or a ValueError naming
    ``name`` when the heads do not group or ``last`` is not ascending inside the keys."""
    hq, hk = q.shape[1], k.shape[1]
    if hq % hk:
        raise ValueError(f"{name}: {hq} query heads do not group onto {hk} KV heads")
    ends = (last.to(torch.int64) + 1).tolist()
    if any(x > y for x, y in zip(ends, ends[1:])) or (ends and (ends[0] < 1 or ends[-1] > k.shape[-2])):
        raise ValueError(f"{name}: last must be ascending and inside the keys")
    return hq // hk, ends


def prefix_rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: torch.Tensor,
                          scale: float | None = None, cells: int | None = None) -> torch.Tensor:
    """Query rows that each see a prefix of the keys: row i attends to keys 0..last[i] (``last`` ascending), e.g.
    CacheBlend's recomputed tokens over the blended cache (scbench/engines/blend.py).

    In row blocks, each over the keys its last row sees, with the query heads that share a KV head attending as one
    head of g x rows (the keys and values are never copied per query head, as SDPA's masked ``enable_gqa`` form
    does) and, on CUDA, no cuDNN (it plans per shape). A block's boolean mask has at most ``cells`` cells (default:
    2^28 on CUDA, whose memory-efficient kernel keeps no score matrix; on the CPU 2^24 score cells over every KV
    head). One masked SDPA over every row and key held [Hq, rows, keys] float32 scores: 330 GB for CacheBlend's
    15% of 131K tokens. q: [B, Hq, R, D]; k, v: [B, Hkv, N, D]; last: [R] ints < N -> [B, Hq, R, D]."""
    b, hq, r, d = q.shape
    hk = k.shape[1]
    g, ends = _row_ends("prefix_rows_attention", q, k, last)
    if cells is None:
        cells = (1 << 28) if q.is_cuda else max(1, (1 << 24) // hk)
    out = torch.empty_like(q)
    a = 0
    while a < r:
        e = a + 1
        while e < r and g * (e + 1 - a) * ends[e] <= cells:  # grow the block while its mask fits
            e += 1
        nk, rows = ends[e - 1], e - a
        cols = torch.arange(nk, device=q.device)
        mask = cols[None, :] < torch.as_tensor(ends[a:e], device=q.device)[:, None]  # [rows, nk]
        qg = q[:, :, a:e].reshape(b, hk, g * rows, d)  # query head h * g + j: row (j, i) of KV head h
        with sdpa_kernel(DECODE_BACKENDS) if q.is_cuda else contextlib.nullcontext():  # one per block: not re-entrant
            o = F.scaled_dot_product_attention(qg, k[:, :, :nk], v[:, :, :nk], scale=scale,
                                               attn_mask=mask[None].expand(g, rows, nk).reshape(g * rows, nk))
        out[:, :, a:e] = o.reshape(b, hq, rows, d)
        a = e
    return out


PREFIX_ROWS = os.environ.get("SCBENCH_PREFIX_ROWS", "auto")
"""How CUDA runs ``prefix_rows`` (CacheBlend's recomputed tokens over the blended cache): ``split``
(``prefix_rows_split``: per row block the keys every row sees as one flash call without a mask, the staircase after
them in float32, merged by log-sum-exp), ``masked`` (``prefix_rows_attention``: memory-efficient SDPA with a
boolean mask over every key of the block, 2 bytes of additive mask per cell read by every KV head), or ``auto``
(the default): the split from ``SPLIT_FROM`` keys, masked below. Measured on an H100 (one layer of Llama-3.1-8B's
shape, 15% of the tokens, bf16; ``scripts/probe_prefix_rows.py``, ``results/perf/prefix_rows_h100.json``): 32K keys
masked 21.5 ms, split 33.8; 131K masked 274.6, split 212.6."""
SPLIT_FROM = int(os.environ.get("SCBENCH_PREFIX_ROWS_SPLIT_FROM", "80000"))
"""Keys from which ``auto`` takes the split: the two measured points' power-law fits (masked ~ n^1.84, split ~
n^1.33 over 32K-131K) cross near 79K."""


def prefix_rows_way(keys: int) -> str:
    """``split`` or ``masked``: how ``prefix_rows`` takes rows over ``keys`` keys on CUDA (``PREFIX_ROWS``)."""
    if PREFIX_ROWS not in ("auto", "split", "masked"):
        raise ValueError(f"SCBENCH_PREFIX_ROWS={PREFIX_ROWS!r}: expected auto, split or masked")
    if PREFIX_ROWS == "auto":
        return "split" if keys >= SPLIT_FROM else "masked"
    return PREFIX_ROWS


def prefix_rows(q, k, v, last, scale: float | None = None) -> torch.Tensor:
    """``prefix_rows_attention``'s rows (row i over keys 0..last[i], ascending) the ``prefix_rows_way``: on CUDA in
    fp16 / bf16 the split where chosen (falling back to the masked form where flash does not take the shapes), else
    masked."""
    fits = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256  # flash's shapes
    if fits and prefix_rows_way(k.shape[2]) == "split":
        out = prefix_rows_split(q, k, v, last, scale)
        if out is not None:
            return out
    return prefix_rows_attention(q, k, v, last, scale)


def prefix_rows_split(q, k, v, last, scale: float | None = None, part=None, cells: int = 1 << 26):
    """Rows that each see a prefix of the keys (row i: keys 0..last[i], ``last`` ascending), in row blocks: the keys
    the block's first row sees, which every row of the block sees, as one call without a mask (``part``: flash,
    ``_flash_part``; the reference ``attention_lse``), the staircase after them (row i: up to last[i]) as float32
    scores with a mask, at most ``cells`` of them, merged exactly by the two log-sum-exps. The query heads that share
    a KV head attend as one head of g x rows (no copy of the keys per query head). None where ``part`` does not take
    the shapes. q: [B, Hq, R, D]; k, v: [B, Hkv, N, D]; last: [R] -> [B, Hq, R, D]."""
    b, hq, r, d = q.shape
    hk = k.shape[1]
    g, ends = _row_ends("prefix_rows_split", q, k, last)
    part = part or _flash_part
    scale = d**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    a = 0
    while a < r:
        e = a + 1
        while e < r and hq * (e + 1 - a) * (ends[e] - ends[a]) <= cells:  # grow the block while its staircase fits
            e += 1
        rows, head, tail = e - a, ends[a], ends[e - 1] - ends[a]
        qg = q[:, :, a:e].reshape(b, hk, g * rows, d)  # query head h * g + j: row (j, i) of KV head h
        got = part(qg, k[:, :, :head], v[:, :, :head], False, scale)
        if got is None:
            return None
        o1, l1 = got
        if tail:
            kt, vt = k[:, :, head : head + tail].float(), v[:, :, head : head + tail].float()
            sc = (qg.float() @ kt.transpose(-1, -2)) * scale  # [B, Hkv, g * rows, tail]
            seen = torch.arange(head, head + tail, device=q.device)[None, :] < torch.as_tensor(
                ends[a:e], device=q.device)[:, None]  # [rows, tail]
            sc = sc.masked_fill(~seen.repeat(g, 1), float("-inf"))
            l2 = torch.logsumexp(sc, -1)  # -inf for a row that sees no key past ``head``
            w = torch.exp(sc - l2.clamp(min=torch.finfo(torch.float32).min)[..., None])
            o2 = w @ vt
            l1 = l1.float()
            m = torch.maximum(l1, l2)
            w1, w2 = torch.exp(l1 - m)[..., None], torch.exp(l2 - m)[..., None]
            og = (o1.float() * w1 + o2 * w2) / (w1 + w2)
        else:
            og = o1
        out[:, :, a:e] = og.reshape(b, hq, rows, d).to(q.dtype)
        a = e
    return out


LSE_BACKENDS = ("cudnn", "flash")
"""SDPA kernels ``causal_attention_lse`` tries in turn (both keep the log-sum-exp for their backward). On an H200
(torch 2.11, 8B layer shape, scripts/bench_h2o_prefill.py): cuDNN 13.1 / 259 ms at 32K / 128K, as fast as the
default SDPA (which picks cuDNN there: same output), flash 26.1 / 434 ms."""


def _lse_flash(q, k, v, scale):
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    try:
        return flash(q, k, v, 0.0, True, False, scale=scale)[:2]
    except RuntimeError:  # a flash build without GQA: repeated keys
        rep = q.shape[1] // k.shape[1]
        if rep == 1:
            raise
        return flash(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), 0.0, True, False, scale=scale)[:2]


def _lse_cudnn(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)[:2]
    return out, lse.squeeze(-1) if lse.dim() == 4 else lse  # cuDNN's statistics are [B, H, T, 1]


def causal_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """``causal_attention`` that also returns each query's natural log-sum-exp of its scaled causal scores
    [B, Hq, Tq] float32 when it comes for free: a CUDA first prefill (Tq == Tk, fp16/bf16) through a fused SDPA
    kernel that keeps it for its backward (``LSE_BACKENDS``); otherwise None: (out, lse)."""
    tq, tk = q.shape[-2], k.shape[-2]
    if q.is_cuda and tq == tk > 1 and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        for name in LSE_BACKENDS:
            try:
                out, lse = {"flash": _lse_flash, "cudnn": _lse_cudnn}[name](q, k, v, scale)
            except RuntimeError:  # this kernel is not built / does not take these shapes: the next one
                continue
            if lse.dtype == torch.float32 and lse.shape == q.shape[:3]:
                return out, lse
    return causal_attention(q, k, v, scale), None


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
