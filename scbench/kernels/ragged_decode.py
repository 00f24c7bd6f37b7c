"""Decode attention over a ragged layer (scbench/kv/ragged.py) in place: per KV head a compressed prefix of its own
length, stored flat ([T, D], head after head, no padding), then the tokens appended since the compression, dense
and shared by every head (the static decode buffer [1, H, C, D], valid up to ``at``).

One query per head (a decode step). Head h attends to its prefix rows ``[off_h, off_h + n_h)`` and to suffix rows
``[0, at]``; nothing is padded, gathered or copied, and shapes stay fixed during a turn (``at`` is a device tensor),
so the step can be captured as a CUDA graph.

- ``ragged_decode_attention``: torch ops (segment max / sums with scatter_reduce and index_add over a head-of-row
  index), float32 accumulation; the CPU path and the CUDA fallback without Triton.
- ``ragged_decode_triton``: a split-K Triton kernel; each (KV head, split) program runs an online softmax over a
  range of the head's virtual sequence (prefix rows, then suffix rows) and ``scbench.kernels.combine`` merges the
  splits; splits past a head's current length do no work.
- ``reference_ragged_decode``: float64 per-head loop, the yardstick of the tests.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def head_of_rows(lengths: list[int], device) -> torch.Tensor:
    """int64 [sum(lengths)]: the KV head owning each flat prefix row."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


def ragged_decode_attention(q, prefix_k, prefix_v, rows_head, suf_k, suf_v, at, scale=None):
    """q: [1, Hq, 1, D]; prefix_k/v: [T, D] flat per-head prefixes; rows_head: int64 [T]; suf_k/v: [1, H, C, D];
    at: int64 [1] (last valid suffix row, -1: none) -> [1, Hq, 1, D]."""
    _, hq, _, d = q.shape
    h, c = suf_k.shape[1], suf_k.shape[2]
    g = hq // h
    scale = d**-0.5 if scale is None else scale
    q3 = q[0, :, 0].reshape(h, g, d).float()
    pk, pv = prefix_k.float(), prefix_v.float()
    sp = torch.einsum("tgd,td->tg", q3.index_select(0, rows_head), pk) * scale  # [T, g]
    ss = torch.einsum("hgd,hcd->hgc", q3, suf_k[0].float()) * scale  # [H, g, C]
    ss = ss.masked_fill(torch.arange(c, device=q.device) > at, float("-inf"))
    idx = rows_head[:, None].expand(-1, g)
    m = torch.full((h, g), float("-inf"), device=q.device).scatter_reduce(0, idx, sp, "amax")
    m = torch.maximum(m, ss.amax(-1))  # each head has >= 1 prefix row: finite
    ep = torch.exp(sp - m.index_select(0, rows_head))
    es = torch.exp(ss - m[..., None])
    den = torch.zeros(h, g, device=q.device).index_add_(0, rows_head, ep) + es.sum(-1)
    num = torch.zeros(h, g, d, device=q.device).index_add_(0, rows_head, ep[:, :, None] * pv[:, None, :])
    num = num + torch.einsum("hgc,hcd->hgd", es, suf_v[0].float())
    return (num / den[..., None]).to(q.dtype).reshape(1, hq, 1, d)


def reference_ragged_decode(q, prefix_k, prefix_v, lengths, suf_k, suf_v, at: int, scale=None):
    """float64, one head at a time: softmax over the head's prefix rows and suffix rows [0, at]."""
    _, hq, _, d = q.shape
    h = len(lengths)
    g = hq // h
    scale = d**-0.5 if scale is None else scale
    out, start = [], 0
    for i, n in enumerate(lengths):
        k = torch.cat([prefix_k[start : start + n], suf_k[0, i, : at + 1]]).double()
        v = torch.cat([prefix_v[start : start + n], suf_v[0, i, : at + 1]]).double()
        start += n
        w = (q[0, i * g : (i + 1) * g, 0].double() @ k.T * scale).softmax(-1)
        out.append(w @ v)
    return torch.cat(out).to(q.dtype).reshape(1, hq, 1, d)


if triton is not None:
    from scbench.kernels.combine import _combine_kernel

    @triton.jit
    def _block(pos, end, n, off, sbase, q, m, total, acc, PK, PV, K, V, cols, scale, D: tl.constexpr,
               PREC: tl.constexpr):
        """Online-softmax update with the keys at virtual positions ``pos`` (< end): prefix rows below n, suffix
        rows from n on."""
        inside = pos < end
        in_pre = inside & (pos < n)
        in_suf = inside & (pos >= n)
        p_off = (off + pos)[:, None].to(tl.int64) * D + cols[None, :]
        s_off = sbase + (pos - n)[:, None].to(tl.int64) * D + cols[None, :]
        k = tl.load(PK + p_off, mask=in_pre[:, None], other=0.0) + tl.load(K + s_off, mask=in_suf[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        sc = tl.where(inside[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # a block wholly past the end: no NaN
        alpha = tl.exp(m - m_use)
        p = tl.exp(sc - m_use[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(PV + p_off, mask=in_pre[:, None], other=0.0) + tl.load(V + s_off, mask=in_suf[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, total, acc

    @triton.jit
    def _ragged_split_kernel(Q, PK, PV, Off, Len, K, V, At, Part, Mx, Sm, scale, C, n_splits,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                             BN: tl.constexpr, PREC: tl.constexpr, DYN: tl.constexpr):
        """One (KV head, split) per program over the head's virtual sequence: prefix rows [0, n_h), then suffix
        rows [0, at] at virtual positions n_h + j."""
        hh, sp = tl.program_id(0), tl.program_id(1)
        off = tl.load(Off + hh)
        n = tl.load(Len + hh).to(tl.int32)
        total_len = n + (tl.load(At) + 1).to(tl.int32)
        rows, cols = tl.arange(0, GP), tl.arange(0, D)
        q = tl.load(Q + hh * G * D + rows[:, None] * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        start = sp * SPLIT
        end = tl.minimum(start + SPLIT, total_len)
        sbase = hh.to(tl.int64) * C * D
        if DYN:  # compiled: loop to the loaded end (splits past a head's length do no work)
            for o in range(start, end, BN):
                m, total, acc = _block(o + tl.arange(0, BN), end, n, off, sbase, q, m, total, acc, PK, PV, K, V,
                                       cols, scale, D, PREC)
        else:  # the interpreter cannot loop to a loaded bound: a static trip count, masked
            for i in range(0, SPLIT, BN):
                m, total, acc = _block(start + i + tl.arange(0, BN), end, n, off, sbase, q, m, total, acc, PK, PV, K,
                                       V, cols, scale, D, PREC)
        out = (hh * n_splits + sp) * GP + rows
        tl.store(Part + out[:, None] * D + cols[None, :], acc)
        tl.store(Mx + out, m)
        tl.store(Sm + out, total)


SHARED_BUDGET = 128 * 1024
"""Bytes of shared memory the kernel's key/value tiles may take (H200: 227 KB per block; the rest is headroom for
Triton's own buffers): each pipeline stage holds 4 [BN, D] tiles (prefix and suffix, keys and values)."""


def tiles(d: int, elt: int, cpu: bool) -> tuple[int, int]:
    """(BN, num_stages) whose 4 x BN x D x elt x stages bytes fit ``SHARED_BUDGET``: 2 stages when they fit, BN
    halved (down to 16) until one stage does. An fp32 run at D=128 with BN 64 and Triton's default 3 stages asked
    for 307 KB on the H200 and failed to launch."""
    if cpu:
        return 16, 1
    bn = 64
    while bn > 16 and 4 * bn * d * elt > SHARED_BUDGET:
        bn //= 2
    return bn, 2 if 2 * 4 * bn * d * elt <= SHARED_BUDGET else 1


def ragged_decode_triton(q, prefix_k, prefix_v, offsets, lengths, max_len: int, suf_k, suf_v, at, scale=None,
                         split: int | None = None):
    """The Triton version of ``ragged_decode_attention`` (CUDA, or the interpreter on CPU tensors).

    offsets, lengths: int64 [H] on q's device (prefix start and count per head); max_len: the longest prefix (host
    int, fixes the grid: splits cover max_len + C virtual rows)."""
    _, hq, _, d = q.shape
    h, c = suf_k.shape[1], suf_k.shape[2]
    g = hq // h
    bn, stages = tiles(d, q.element_size(), q.device.type == "cpu")
    if split is None:  # a power of two (16-32 splits): SPLIT is a constexpr and layers' lengths differ (AdaKV,
        # KVzip); a multiple of BN per length compiled a kernel per layer in the warm-up step (likely most of the
        # 4 s / 9 s warm-up of AdaKV / KVzip at 32K on an H200)
        split = max(256, triton.next_power_of_2(-(-(max_len + c) // 32)))
    n_splits = -(-(max_len + c) // split)
    gp = max(16, triton.next_power_of_2(g))
    q3 = q.reshape(h, g, d).contiguous()
    part = torch.empty(h * n_splits * gp, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(h * n_splits * gp, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty(h, g, d, dtype=q.dtype, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _ragged_split_kernel[(h, n_splits)](q3, prefix_k, prefix_v, offsets, lengths, suf_k, suf_v, at, part, mx, sm,
                                        d**-0.5 if scale is None else scale, c, n_splits,
                                        G=g, GP=gp, D=d, SPLIT=split, BN=bn, PREC=prec,
                                        DYN=os.environ.get("TRITON_INTERPRET") != "1", num_stages=stages)
    _combine_kernel[(h, g)](part, mx, sm, out, n_splits, G=g, GP=gp, D=d, NS=max(2, triton.next_power_of_2(n_splits)))
    return out.view(1, hq, 1, d)
