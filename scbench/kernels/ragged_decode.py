"""Decode attention over a ragged layer (scbench/kv/ragged.py) in place: per KV head a compressed prefix of its own
length, stored flat ([T, D], head after head, no padding), then the tokens appended since the compression, dense
and shared by every head (the static decode buffer [1, H, C, D], valid up to ``at``).

One query per head (a decode step). Head h attends to its prefix rows ``[off_h, off_h + n_h)`` and to suffix rows
``[0, at]``; nothing is padded, gathered or copied, and shapes stay fixed during a turn (``at`` is a device tensor),
so the step can be captured as a CUDA graph.

- ``ragged_decode_attention``: torch ops (segment max / sums with scatter_reduce and index_add over a head-of-row
  index), float32 accumulation; the CPU path and the CUDA fallback without Triton.
- ``ragged_decode_triton``: a split-K Triton kernel over a work list built once per turn (``WorkList``): each
  program runs an online softmax over ``split`` rows of one head's virtual sequence (prefix rows, then suffix
  rows), every head cut by its own length, so the grid follows the bytes; a combine kernel merges each head's
  items (``scbench.kernels.combine.merge_splits``).
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


class WorkList:
    """The (KV head, first virtual row) of every program of ``ragged_decode_triton``, built once per turn from the
    host's head lengths: each head's own virtual sequence (its prefix, then the C suffix rows of the turn's
    buffer) is cut into ``split``-row pieces, so the grid follows the bytes (DuoAttention at 131K: 4 heads of
    131K and 4 of 4K per layer give about 4 x 120 + 4 x 4 programs of 1,088 rows, where the old per-head grid ran
    8 heads x the longest head's 17 splits of 8,192 rows, half of them empty)."""

    def __init__(self, lengths: list[int], c: int, device, split: int | None = None, programs: int | None = None):
        if split is None:
            split = pick_split(lengths, c, programs or 4 * sm_count(device))
        heads, starts, base, count = [], [], [], []
        for h, n in enumerate(lengths):
            k = -(-(n + c) // split)
            base.append(len(heads))
            count.append(k)
            heads += [h] * k
            starts += [j * split for j in range(k)]
        self.split, self.n, self.max_count = split, len(heads), max(count)
        self.items = torch.tensor([heads, starts], dtype=torch.int32, device=device)
        self.base = torch.tensor(base, dtype=torch.int32, device=device)
        self.count = torch.tensor(count, dtype=torch.int32, device=device)


MAX_ITEMS = 128
"""Most pieces one head is cut into by default (the combine merges them in one [NS, D] tile, NS = MAX_ITEMS: one
compile for every length)."""


def sm_count(device) -> int:
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def pick_split(lengths: list[int], c: int, programs: int, max_items: int = MAX_ITEMS) -> int:
    """Rows per program, a multiple of 64 (a runtime argument: one compile for every length): about ``programs``
    pieces in all, at most ``max_items`` per head, at least 256 rows."""
    split = max(-(-sum(n + c for n in lengths) // max(1, programs)), -(-(max(lengths) + c) // max_items), 256)
    return -(-split // 64) * 64


if triton is not None:
    from scbench.kernels.combine import merge_splits

    @triton.jit
    def _block(pos, end, n, off, sbase, q, m, total, acc, PK, PV, K, V, cols, scale, D: tl.constexpr,
               PREC: tl.constexpr, PART: tl.constexpr):
        """Online-softmax update with the keys at virtual positions ``pos`` (< end): prefix rows below n, suffix
        rows from n on. PART 1: every position is a prefix row, 2: every one a suffix row, 0: either (masked)."""
        inside = pos < end
        if PART == 1:
            p_off = (off + pos)[:, None].to(tl.int64) * D + cols[None, :]
            k = tl.load(PK + p_off, mask=inside[:, None], other=0.0)
        elif PART == 2:
            s_off = sbase + (pos - n)[:, None].to(tl.int64) * D + cols[None, :]
            k = tl.load(K + s_off, mask=inside[:, None], other=0.0)
        else:
            in_pre = inside & (pos < n)
            in_suf = inside & (pos >= n)
            p_off = (off + pos)[:, None].to(tl.int64) * D + cols[None, :]
            s_off = sbase + (pos - n)[:, None].to(tl.int64) * D + cols[None, :]
            k = tl.load(PK + p_off, mask=in_pre[:, None], other=0.0) + tl.load(K + s_off, mask=in_suf[:, None],
                                                                               other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        sc = tl.where(inside[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # a block wholly past the end: no NaN
        alpha = tl.exp(m - m_use)
        p = tl.exp(sc - m_use[:, None])
        total = total * alpha + tl.sum(p, 1)
        if PART == 1:
            v = tl.load(PV + p_off, mask=inside[:, None], other=0.0)
        elif PART == 2:
            v = tl.load(V + s_off, mask=inside[:, None], other=0.0)
        else:
            v = tl.load(PV + p_off, mask=in_pre[:, None], other=0.0) + tl.load(V + s_off, mask=in_suf[:, None],
                                                                               other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, total, acc

    @triton.jit(do_not_specialize=["C", "W", "split"])  # one compile for every length and split
    def _ragged_split_kernel(Q, PK, PV, Off, Len, K, V, At, Items, Part, Mx, Sm, scale, C, W, split,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                             BN: tl.constexpr, PREC: tl.constexpr, DYN: tl.constexpr):
        """One work item per program: head ``Items[0, i]``, virtual rows [Items[1, i], + split) of its sequence
        (prefix rows [0, n_h), then suffix rows [0, at] at virtual positions n_h + j). ``SPLIT``: the interpreter's
        static trip count (= split; 0 when compiled)."""
        it = tl.program_id(0)
        hh = tl.load(Items + it)
        start = tl.load(Items + W + it)
        off = tl.load(Off + hh)
        n = tl.load(Len + hh).to(tl.int32)
        total_len = n + (tl.load(At) + 1).to(tl.int32)
        rows, cols = tl.arange(0, GP), tl.arange(0, D)
        q = tl.load(Q + hh * G * D + rows[:, None] * D + cols[None, :], mask=rows[:, None] < G, other=0.0)
        m = tl.full([GP], float("-inf"), tl.float32)
        total = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        end = tl.minimum(start + split, total_len)
        sbase = hh.to(tl.int64) * C * D
        if DYN:  # compiled: the prefix rows, then the suffix rows, each loop to its loaded bound
            pre_end = tl.minimum(end, n)
            for o in range(start, pre_end, BN):
                m, total, acc = _block(o + tl.arange(0, BN), pre_end, n, off, sbase, q, m, total, acc, PK, PV, K, V,
                                       cols, scale, D, PREC, 1)
            for o in range(tl.maximum(start, n), end, BN):
                m, total, acc = _block(o + tl.arange(0, BN), end, n, off, sbase, q, m, total, acc, PK, PV, K, V,
                                       cols, scale, D, PREC, 2)
        else:  # the interpreter cannot loop to a loaded bound: a static trip count, masked
            for i in range(0, SPLIT, BN):
                m, total, acc = _block(start + i + tl.arange(0, BN), end, n, off, sbase, q, m, total, acc, PK, PV, K,
                                       V, cols, scale, D, PREC, 0)
        out = it * GP + rows
        tl.store(Part + out[:, None] * D + cols[None, :], acc)
        tl.store(Mx + out, m)
        tl.store(Sm + out, total)

    @triton.jit
    def _ragged_combine_kernel(Part, Mx, Sm, Out, Base, Count, G: tl.constexpr, GP: tl.constexpr,
                               D: tl.constexpr, NS: tl.constexpr):
        """(KV head, query head of the group): merge the head's own work items (``Count[h]`` from ``Base[h]``)."""
        hh, g = tl.program_id(0), tl.program_id(1)
        b = tl.load(Base + hh).to(tl.int64) * GP
        merge_splits(Part + b * D, Mx + b, Sm + b, Out + hh * G * D, tl.load(Count + hh), 0, g, G, GP, D, NS)


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


def ragged_decode_triton(q, prefix_k, prefix_v, offsets, lengths, work: WorkList, suf_k, suf_v, at, scale=None,
                         dyn: bool | None = None):
    """The Triton version of ``ragged_decode_attention`` (CUDA, or the interpreter on CPU tensors).

    offsets, lengths: int64 [H] on q's device (prefix start and count per head); work: the turn's ``WorkList``
    (built for these lengths and C = suf_k.shape[2]). ``dyn``: loops to loaded bounds, prefix and suffix apart (None:
    unless interpreting; the interpreter runs them only with tests' index patch)."""
    _, hq, _, d = q.shape
    h, c = suf_k.shape[1], suf_k.shape[2]
    g = hq // h
    bn, stages = tiles(d, q.element_size(), q.device.type == "cpu")
    if work.split % bn:
        raise ValueError(f"ragged decode: work split {work.split} is not a multiple of the key block {bn}")
    gp = max(16, triton.next_power_of_2(g))
    q3 = q.reshape(h, g, d).contiguous()
    part = torch.empty(work.n * gp, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(work.n * gp, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty(h, g, d, dtype=q.dtype, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    dyn = os.environ.get("TRITON_INTERPRET") != "1" if dyn is None else dyn
    _ragged_split_kernel[(work.n,)](q3, prefix_k, prefix_v, offsets, lengths, suf_k, suf_v, at, work.items, part, mx,
                                    sm, d**-0.5 if scale is None else scale, c, work.n, work.split, G=g, GP=gp, D=d,
                                    SPLIT=0 if dyn else work.split, BN=bn, PREC=prec, DYN=dyn, num_stages=stages)
    _ragged_combine_kernel[(h, g)](part, mx, sm, out, work.base, work.count, G=g, GP=gp, D=d,
                                   NS=max(MAX_ITEMS, triton.next_power_of_2(work.max_count)))
    return out.view(1, hq, 1, d)
