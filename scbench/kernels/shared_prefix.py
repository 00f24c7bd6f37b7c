"""Shared-prefix decode attention of a batch of requests over ONE context cache (Triton), and the batch's rope/store.

``shared_prefix_decode(q, shared_k, shared_v, shared_len, own_k, own_v, own_at, scale)``: B requests decode one
token each; every request attends to a prefix of the one shared context KV [1, Hkv, S, D] (row b sees its first
``shared_len[b]`` keys) plus its own short buffer of keys [B, Hkv, C, D] (its prompt tokens not in the shared cache
and the tokens generated so far, ``own_at[b]`` the last valid index). The batch is folded into the GQA group: for a
KV head the B x g query rows form one tile, so each block of context keys is loaded once for the whole batch and the
scores are one tensor-core product (tiles of at most ``CONFIG["rows"]`` rows). The context is split over T
(flash-decoding); each split keeps its output, max and sum per row; one more program per request of a tile attends
its own keys (other requests' rows masked); ``combine.merge_splits`` then merges all of them exactly
(log-sum-exp). Two launches per layer, no host sync (a CUDA graph captures it); the split size is a runtime
argument, so a new context length compiles nothing. Reference: ``scbench.batch_step.shared_prefix_attention``
(torch, float32), itself checked against the float64 ``reference_shared_prefix_attention``.

``rope_store_rows(qkv, cos, sin, kbuf, vbuf, at, hq, hkv)``: the batched decode step's fused rotary embedding of q
and k of the fused q/k/v projection, k/v written at each row's own position ``at[b]`` (batch version of
``fused.rope_store``; reference ``rope_store_rows_ref``).
"""
from __future__ import annotations

import json
import os

import torch

from scbench.kernels import fused
from scbench.kernels.fused import rotate_half

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

CONFIG = {"bn": 64, "max_splits": 64, "min_split": 256, "rows": 32, "launch": {"num_warps": 4, "num_stages": 2}}
"""Keys per block, at most this many context splits per KV head (each at least ``min_split`` keys), query rows per
tile (a larger batch takes several tiles, each reading the context once), Triton launch options.
``SCBENCH_SHARED_PREFIX`` (JSON) overrides keys of it (scripts/bench_shared_prefix.py --sweep measures them)."""
if os.environ.get("SCBENCH_SHARED_PREFIX"):
    CONFIG.update(json.loads(os.environ["SCBENCH_SHARED_PREFIX"]))


def available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for ``x`` (CUDA with Triton, or CPU tensors under the interpreter in tests:
    ``fused.CPU_KERNELS``)."""
    return triton is not None and (x.is_cuda or fused.CPU_KERNELS)


if triton is not None:
    from scbench.kernels.combine import merge_splits

    @triton.jit
    def _attend_block(q, acc, m, total, K, V, kv_base, s_tok, off, end, lim, cols, scale,
                      BN: tl.constexpr, PREC: tl.constexpr):
        """One online-softmax step over keys [off, off + BN) below ``end``; row r counts keys < lim[r]."""
        keys = off + tl.arange(0, BN)
        inside = keys < end
        kv_off = kv_base + keys[:, None].to(tl.int64) * s_tok + cols[None, :]
        k = tl.load(K + kv_off, mask=inside[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        sc = tl.where(inside[None, :] & (keys[None, :] < lim[:, None]), sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        v = tl.load(V + kv_off, mask=inside[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return acc, m_new, total * alpha + tl.sum(p, 1)

    @triton.jit
    def _shared_prefix_kernel(Q, SK, SV, SLen, OK, OV, OAt, Part, Mx, Sm, scale, S, C, n_ctx, n_splits, split,
                              s_head, s_tok, B, HKV: tl.constexpr, G: tl.constexpr, RT: tl.constexpr,
                              NT: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
                              DYN: tl.constexpr, SPLIT_I: tl.constexpr, OWN_CAP: tl.constexpr):
        """Program (KV head h x row tile t, split sp) over query rows r = t * RT + i (request r // G, query head
        h * G + r % G): sp < n_ctx attends the context keys [sp * split, + split) (row r: those below SLen[r // G]);
        sp = n_ctx + j attends the own keys [0, OAt[b]] of the tile's j-th request b (other rows stay empty)."""
        ht, sp = tl.program_id(0), tl.program_id(1)
        h, t = ht // NT, ht % NT
        rows = t * RT + tl.arange(0, RT)
        cols = tl.arange(0, D)
        req = rows // G
        live = req < B
        q_off = (req * HKV * G + h * G + rows % G)[:, None] * D + cols[None, :]  # q [B, HKV * G, 1, D]
        q = tl.load(Q + q_off, mask=live[:, None], other=0.0)
        m = tl.full([RT], -1.0e30, tl.float32)  # finite: a row with no key in a block gets weight 0, not NaN
        total = tl.zeros([RT], tl.float32)
        acc = tl.zeros([RT, D], tl.float32)
        if sp < n_ctx:
            slen = tl.load(SLen + req, mask=live, other=0).to(tl.int32)
            start = sp * split
            end = tl.minimum(start + split, S)
            base = h.to(tl.int64) * s_head
            if DYN:
                for off in range(start, end, BN):
                    acc, m, total = _attend_block(q, acc, m, total, SK, SV, base, s_tok, off, end, slen, cols,
                                                  scale, BN, PREC)
            else:  # the interpreter's loops want plain ints: a constant trip count, keys past end masked
                for i in range(0, SPLIT_I, BN):
                    acc, m, total = _attend_block(q, acc, m, total, SK, SV, base, s_tok, start + i, end, slen, cols,
                                                  scale, BN, PREC)
        else:  # one of the requests with rows in this tile: its own keys
            b = (t * RT) // G + sp - n_ctx
            end = tl.where(b < B, tl.load(OAt + b, mask=b < B, other=-1) + 1, 0).to(tl.int32)
            lim = tl.where(req == b, end, 0)
            base = (b * HKV + h).to(tl.int64) * C * D
            if DYN:
                for off in range(0, end, BN):
                    acc, m, total = _attend_block(q, acc, m, total, OK, OV, base, D, off, end, lim, cols, scale,
                                                  BN, PREC)
            else:
                for off in range(0, OWN_CAP, BN):
                    acc, m, total = _attend_block(q, acc, m, total, OK, OV, base, D, off, end, lim, cols, scale,
                                                  BN, PREC)
        out = (ht * n_splits + sp) * RT + tl.arange(0, RT)
        tl.store(Part + out[:, None] * D + cols[None, :], acc)
        tl.store(Mx + out, m)
        tl.store(Sm + out, total)

    @triton.jit
    def _merge_kernel(Part, Mx, Sm, Out, n_splits, HKV: tl.constexpr, G: tl.constexpr, RT: tl.constexpr,
                      NT: tl.constexpr, D: tl.constexpr, NS: tl.constexpr):
        """Program (KV head h, row r): merge its n_splits partials into Out [B, HKV * G, 1, D]."""
        h, r = tl.program_id(0), tl.program_id(1)
        first = ((h * NT + r // RT) * n_splits) * RT + r % RT
        out = ((r // G) * HKV * G + h * G + r % G) * D
        merge_splits(Part + first * D, Mx + first, Sm + first, Out + out, n_splits, 0, 0, 1, RT, D, NS)


def shared_prefix_decode(q: torch.Tensor, shared_k: torch.Tensor, shared_v: torch.Tensor, shared_len: torch.Tensor,
                         own_k: torch.Tensor, own_v: torch.Tensor, own_at: torch.Tensor, scale: float | None = None,
                         split: int | None = None, bn: int | None = None, launch: dict | None = None,
                         rows: int | None = None) -> torch.Tensor:
    """q [B, Hq, 1, D]; shared_k/v [1, Hkv, S, D] (last dim contiguous, any head/token strides); shared_len int64
    [B]; own_k/v [B, Hkv, C, D] contiguous; own_at int64 [B] -> [B, Hq, 1, D] in q's dtype (module docstring).
    ``split`` (context keys per split), ``bn`` (keys per block), ``launch`` and ``rows`` (query rows per tile: B x G
    rows are cut into tiles of at most this many, each reading the context once) default to ``CONFIG``."""
    b, hq, _, d = q.shape
    hkv, s_len = shared_k.shape[1], shared_k.shape[2]
    g = hq // hkv
    if shared_k.stride() != shared_v.stride() or shared_k.stride(-1) != 1:
        shared_k, shared_v = shared_k.contiguous(), shared_v.contiguous()
    own_k, own_v, q = own_k.contiguous(), own_v.contiguous(), q.contiguous()
    bn = CONFIG["bn"] if bn is None else bn
    launch = CONFIG["launch"] if launch is None else launch
    if split is None:  # enough programs to fill the GPU, at most max_splits per head (runtime: no compile per length)
        split = max(CONFIG["min_split"], -(-s_len // CONFIG["max_splits"] // bn) * bn)
    if split % bn:
        raise ValueError(f"split ({split}) must be a multiple of bn ({bn})")
    n_ctx = -(-s_len // split) if s_len else 0
    rt = max(16, min(triton.next_power_of_2(b * g), CONFIG["rows"] if rows is None else rows))
    nt = -(-b * g // rt)
    rq = min(b, (rt - 1) // g + 2)  # requests a tile of rt consecutive rows can touch
    n_splits = n_ctx + rq  # the context splits, then one per request of a tile (its own keys)
    part = torch.empty(hkv * nt * n_splits * rt, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(hkv * nt * n_splits * rt, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty_like(q)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _shared_prefix_kernel[(hkv * nt, n_splits)](
        q, shared_k, shared_v, shared_len, own_k, own_v, own_at, part, mx, sm, d**-0.5 if scale is None else scale,
        s_len, own_k.shape[2], n_ctx, n_splits, split, shared_k.stride(1), shared_k.stride(2), b,
        HKV=hkv, G=g, RT=rt, NT=nt, D=d, BN=bn, PREC=prec, DYN=not INTERPRET,
        SPLIT_I=split if INTERPRET else 0, OWN_CAP=own_k.shape[2] if INTERPRET else 0, **(launch or {}))
    _merge_kernel[(hkv, b * g)](part, mx, sm, out, n_splits, HKV=hkv, G=g, RT=rt, NT=nt, D=d,
                                NS=max(2, triton.next_power_of_2(n_splits)))
    return out


# --- the batched step's rotary embedding + own-key store -------------------------------------------------------
def rope_store_rows_ref(qkv, cos, sin, kbuf, vbuf, at, hq: int, hkv: int):
    """qkv [B, 1, (hq + 2 hkv) D]; cos, sin [B, 1, D]; kbuf, vbuf [B, hkv, C, D]; at int64 [B] -> q [B, hq, 1, D].
    As LlamaAttention + SharedPrefixKV.update: rotary embedding of q and k, row b's k and v written at ``at[b]``."""
    b, d = qkv.shape[0], kbuf.shape[-1]
    q, k, v = qkv.view(b, 1, hq + 2 * hkv, d).transpose(1, 2).split([hq, hkv, hkv], dim=1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = (q * cos) + (rotate_half(q) * sin)
    k = (k * cos) + (rotate_half(k) * sin)
    rows = torch.arange(b, device=qkv.device)
    kbuf[rows, :, at] = k[:, :, 0]
    vbuf[rows, :, at] = v[:, :, 0]
    return q


if triton is not None:

    @triton.jit
    def _rope_rows_kernel(QKV, Cos, Sin, Q, Kb, Vb, At, C, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, D)
        half = D // 2
        at = tl.load(At + b)
        row = QKV + b * (HQ + 2 * HKV) * D
        x = tl.load(row + h * D + d)
        dt = x.dtype
        if h < HQ + HKV:  # a query or key head: rotate (rounding as the Hugging Face modules do)
            partner = tl.load(row + h * D + tl.where(d < half, d + half, d - half)).to(tl.float32)
            rot = tl.where(d < half, -partner, partner)
            c = tl.load(Cos + b * D + d).to(tl.float32)
            s = tl.load(Sin + b * D + d).to(tl.float32)
            y = ((x.to(tl.float32) * c).to(dt).to(tl.float32) + (rot * s).to(dt).to(tl.float32)).to(dt)
            if h < HQ:
                tl.store(Q + (b * HQ + h) * D + d, y)
            else:
                tl.store(Kb + ((b * HKV + h - HQ).to(tl.int64) * C + at) * D + d, y)
        else:  # a value head: copy into the buffer
            tl.store(Vb + ((b * HKV + h - HQ - HKV).to(tl.int64) * C + at) * D + d, x)


def rope_store_rows(qkv, cos, sin, kbuf, vbuf, at, hq: int, hkv: int):
    """See ``rope_store_rows_ref``; kbuf, vbuf contiguous, head dim a power of two."""
    if not available(qkv) or cos.dtype != qkv.dtype:
        return rope_store_rows_ref(qkv, cos, sin, kbuf, vbuf, at, hq, hkv)
    b, d = qkv.shape[0], kbuf.shape[-1]
    q = qkv.new_empty(b, hq, 1, d)
    _rope_rows_kernel[(b, hq + 2 * hkv)](qkv.contiguous(), cos.contiguous(), sin.contiguous(), q, kbuf, vbuf, at,
                                         kbuf.shape[2], HQ=hq, HKV=hkv, D=d, num_warps=1)
    return q
