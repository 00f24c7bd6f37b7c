"""Decode attention of one query per head over a static key buffer's valid prefix (``scbench.engines.fastdecode``'s
default attention): ``split_kv_decode_attention``, a flash-decoding Triton kernel (CUDA), and its torch reference
``masked_decode_attention`` (also the CPU path). ``tests/engines/test_fast_decode.py`` compares them."""
from __future__ import annotations

import json
import os

import torch


def masked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masked: torch.Tensor,
                            scale: float | None = None, chunk: int = 256) -> torch.Tensor:
    """One query per head over a key buffer whose ``masked`` positions do not count (torch ops only).

    q: [B, Hq, 1, D]; k, v: [B, Hkv, C, D] (contiguous, C a multiple of ``chunk``, Hq a multiple of Hkv);
    masked: bool [C] (True: ignore that key) -> [B, Hq, 1, D]. Scores and the softmax are float32 (bf16/fp16
    products accumulate in float32); the value product runs as independent ``chunk``-key products (parallel on
    a GPU) summed afterwards. No host synchronisation: it can be replayed inside a captured decode step.
    Reference: ``attention.causal_attention(q, k[..., :n, :], v[..., :n, :])`` when the first n keys count.
    """
    b, hq, _, d = q.shape
    hkv, c, out_dtype = k.shape[1], k.shape[2], q.dtype
    g, n = hq // hkv, c // chunk
    scale = d**-0.5 if scale is None else scale
    acc = {}
    if q.dtype != torch.float32:
        if q.is_cuda:
            acc = {"out_dtype": torch.float32}
        else:
            q, k, v = q.float(), k.float(), v.float()
    s = torch.bmm(q.reshape(b * hkv, g, d), k.view(b * hkv, c, d).transpose(1, 2), **acc)  # [B*Hkv, g, C]
    s.masked_fill_(masked, float("-inf"))
    p = s.mul_(scale).softmax(-1).to(v.dtype)
    p = p.view(b * hkv, g, n, chunk).transpose(1, 2).reshape(b * hkv * n, g, chunk)
    o = torch.bmm(p, v.view(b * hkv * n, chunk, d), **acc)  # [B*Hkv*n, g, D]
    return o.view(b * hkv, n, g, d).sum(1).to(out_dtype).view(b, hq, 1, d)


try:  # the split-KV decode kernel needs Triton (CUDA); CPU runs use masked_decode_attention
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:
    from scbench.kernels.combine import _combine_kernel

    @triton.jit
    def _split_kv_kernel(Q, K, V, At, Part, Mx, Sm, scale, C, n_splits,
                         G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                         BN: tl.constexpr, PREC: tl.constexpr):
        """One (batch x KV head, split) per program: online softmax over keys [split start, min(end, valid))."""
        bh, sp = tl.program_id(0), tl.program_id(1)
        valid = (tl.load(At) + 1).to(tl.int32)
        rows, cols = tl.arange(0, GP), tl.arange(0, D)
        q = tl.load(Q + bh * G * D + rows[:, None] * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        start = sp * SPLIT
        end = tl.minimum(start + SPLIT, valid)
        base = bh.to(tl.int64) * C * D
        for off in range(start, end, BN):
            keys = off + tl.arange(0, BN)
            inside = keys < end
            kv_off = base + keys[:, None].to(tl.int64) * D + cols[None, :]
            k = tl.load(K + kv_off, mask=inside[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            sc = tl.where(inside[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_off, mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m = m_new
        out = (bh * n_splits + sp) * GP + rows
        tl.store(Part + out[:, None] * D + cols[None, :], acc)
        tl.store(Mx + out, m)
        tl.store(Sm + out, total)


SPLIT_KV = {"bn": 64, "max_splits": 64, "launch": {"num_warps": 4, "num_stages": 2}}
"""The split-KV kernel's defaults: keys per block, at most this many splits per head (splits of at least 256
keys), Triton launch options (num_warps, num_stages). ``SCBENCH_SPLIT_KV`` (JSON) overrides keys of it.
Measured on an H200 (scripts/bench_split_kv.py, results/perf/decode_step_fused.md): 2 stages instead of Triton's
default 3 read a 128K-token layer at 4.1 TB/s instead of 3.65."""
if os.environ.get("SCBENCH_SPLIT_KV"):
    SPLIT_KV.update(json.loads(os.environ["SCBENCH_SPLIT_KV"]))


def split_kv_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, at: torch.Tensor,
                              scale: float | None = None, split: int | None = None, bn: int | None = None,
                              launch: dict | None = None) -> torch.Tensor:
    """Flash-decoding style attention of one query per head over the first ``at + 1`` keys (Triton, CUDA).

    q: [B, Hq, 1, D]; k, v: [B, Hkv, C, D] contiguous; at: int64 [1] on the device, the last valid key index
    (read by the kernel, so a captured graph sees its current value) -> [B, Hq, 1, D]. Keys are split into
    ranges processed in parallel (online softmax in float32 in each), then merged; ranges past the valid
    length do no work, so the cost follows the keys in use, not the buffer's capacity.
    ``split``, ``bn`` (keys per inner block) and ``launch`` (Triton's num_warps / num_stages) default to
    ``SPLIT_KV`` (scripts/bench_split_kv.py sweeps them).
    Reference: ``masked_decode_attention`` / ``attention.causal_attention`` on the valid prefix.
    """
    b, hq, _, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    g = hq // hkv
    bn = SPLIT_KV["bn"] if bn is None else bn
    launch = SPLIT_KV["launch"] if launch is None else launch
    if split is None:  # enough programs to fill the GPU, at most max_splits splits per head
        split = max(256, -(-c // SPLIT_KV["max_splits"] // bn) * bn)
    n_splits = -(-c // split)
    gp = max(16, triton.next_power_of_2(g))
    q3 = q.reshape(b * hkv, g, d).contiguous()
    part = torch.empty(b * hkv * n_splits * gp, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b * hkv * n_splits * gp, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty(b * hkv, g, d, dtype=q.dtype, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _split_kv_kernel[(b * hkv, n_splits)](q3, k, v, at, part, mx, sm, d**-0.5 if scale is None else scale, c, n_splits,
                                          G=g, GP=gp, D=d, SPLIT=split, BN=bn, PREC=prec, **(launch or {}))
    _combine_kernel[(b * hkv, g)](part, mx, sm, out, n_splits, G=g, GP=gp, D=d,
                                  NS=max(2, triton.next_power_of_2(n_splits)))
    return out.view(b, hq, 1, d)
