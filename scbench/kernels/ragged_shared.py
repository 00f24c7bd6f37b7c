"""Shared-prefix decode attention of a batch of requests over ONE ragged context layer (AdaKV, KVzip, DuoAttention).

A ragged layer (scbench/kv/ragged.py) holds per KV head h a compressed prefix of its own length n_h (flat
``prefix_k`` [T, D], head after head) and a dense suffix of the tokens appended after the compression
(``keys`` [1, H, t, D], every head). In a batched decode (scbench/batch.py) each request b sees, per head, the
whole prefix plus the first ``suf_len[b]`` suffix rows (multi-turn: the turns before it; multi-request: none or
all), then its own keys ``own_k[b, h, : own_at[b] + 1]`` (its prompt tokens not in the shared cache and what it
generated so far). Nothing is padded or copied: head h's context is read in place as one virtual sequence
(prefix rows, then suffix rows), exactly like the single-request ragged kernel (scbench/kernels/ragged_decode.py).

- ``ragged_shared_decode``: Triton. The batch is folded into the GQA group (B x g query rows of a KV head form one
  tile, so each context block is loaded once for the whole batch); a work list (``SharedWork``, built once per
  batch and layer) cuts each head's virtual sequence by its own length into ``split``-row pieces (the grid follows
  the bytes), followed per head by one piece per request of a tile for its own keys. A merge kernel combines each
  (head, row)'s pieces exactly (log-sum-exp, ``combine.merge_splits``). Two launches per layer, no host sync (a CUDA
  graph captures it).
- ``ragged_shared_attention``: torch, float32, head by head: the plain path (CPU, or ``SCBENCH_BATCH_KERNEL=torch``)
  and what the kernel is tested against.
- ``reference_ragged_shared``: float64, row by row and head by head, the yardstick.
"""
from __future__ import annotations

import os

import torch

from scbench.kernels import ragged_decode as rd

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROWS = 32
"""Query rows per tile (B x g rows are cut into tiles of at most this many; each tile reads the context once)."""


def offsets_of(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths[:-1]:
        out.append(out[-1] + n)
    return out


def ragged_shared_attention(q, prefix_k, prefix_v, lengths: list[int], suf_k, suf_v, suf_len, own_k, own_v, own_at,
                            scale: float | None = None):
    """q [B, Hq, 1, D]; prefix_k/v [T, D] (head h: rows [off_h, off_h + lengths[h])); suf_k/v [1, H, t, D]; suf_len
    int64 [B] (suffix rows row b sees); own_k/v [B, H, C, D]; own_at int64 [B] (>= 0) -> [B, Hq, 1, D] in q's dtype.
    Head by head, float32: the B x g query rows against the head's context (read once) and each row's own keys, one
    softmax over both."""
    b, hq, _, d = q.shape
    h, c = len(lengths), own_k.shape[2]
    g = hq // h
    scale = d**-0.5 if scale is None else scale
    own_masked = (torch.arange(c, device=q.device).view(1, 1, c) > own_at.view(b, 1, 1))
    outs = []
    for i, (off, n) in enumerate(zip(offsets_of(lengths), lengths)):
        k = torch.cat([prefix_k[off : off + n], suf_k[0, i]]).float()
        v = torch.cat([prefix_v[off : off + n], suf_v[0, i]]).float()
        qh = q[:, i * g : (i + 1) * g, 0].float()  # [B, g, D]
        s1 = torch.einsum("bgd,nd->bgn", qh, k) * scale
        seen = torch.arange(k.shape[0], device=q.device).view(1, 1, -1) >= (suf_len + n).view(b, 1, 1)
        s1 = s1.masked_fill(seen, float("-inf"))
        s2 = torch.einsum("bgd,bcd->bgc", qh, own_k[:, i].float()) * scale
        w = torch.cat([s1, s2.masked_fill(own_masked, float("-inf"))], -1).softmax(-1)
        out = w[..., : k.shape[0]] @ v + torch.einsum("bgc,bcd->bgd", w[..., k.shape[0] :], own_v[:, i].float())
        outs.append(out.unsqueeze(2))
    return torch.cat(outs, dim=1).to(q.dtype)


def reference_ragged_shared(q, prefix_k, prefix_v, lengths: list[int], suf_k, suf_v, suf_len, own_k, own_v, own_at,
                            scale=None):
    """float64: every row and KV head on its own keys (prefix, seen suffix rows, own keys), plain softmax."""
    b, hq, _, d = q.shape
    g = hq // len(lengths)
    scale = d**-0.5 if scale is None else scale
    out = torch.empty(b, hq, 1, d, dtype=torch.float64)
    for r in range(b):
        s, a = int(suf_len[r]), int(own_at[r]) + 1
        for i, (off, n) in enumerate(zip(offsets_of(lengths), lengths)):
            k = torch.cat([prefix_k[off : off + n], suf_k[0, i, :s], own_k[r, i, :a]]).double().cpu()
            v = torch.cat([prefix_v[off : off + n], suf_v[0, i, :s], own_v[r, i, :a]]).double().cpu()
            w = (q[r, i * g : (i + 1) * g, 0].double().cpu() @ k.T * scale).softmax(-1)
            out[r, i * g : (i + 1) * g, 0] = w @ v
    return out.to(q.dtype)


def tiling(b: int, g: int, rows: int | None = None) -> tuple[int, int, int]:
    """(rows per tile, tiles, requests a tile can touch) for B x g query rows."""
    p2 = 1 << max(0, (b * g - 1).bit_length())
    rt = max(16, min(p2, rows or ROWS))
    return rt, -(-b * g // rt), min(b, (rt - 1) // g + 2)


class SharedWork:
    """The pieces of one layer, per KV head contiguous (the merge reads a head's pieces as one run): its context
    pieces (``Items[1] = first virtual row``, each ``split`` rows of prefix n_h + suffix t) then ``rq`` own pieces
    (``Items[1] = -1 - j``: the tile's j-th request's own keys). Built once per batch (lengths fixed for a decode)."""

    def __init__(self, lengths: list[int], t: int, rq: int, device, split: int | None = None,
                 programs: int | None = None):
        if split is None:  # at most rd.MAX_ITEMS pieces per head with the own ones: the merge's tile stays 128 rows
            split = rd.pick_split(lengths, t, programs or 4 * rd.sm_count(device), max(1, rd.MAX_ITEMS - rq))
        heads, starts, base, count = [], [], [], []
        for h, n in enumerate(lengths):
            k = -(-(n + t) // split)
            base.append(len(heads))
            count.append(k + rq)
            heads += [h] * (k + rq)
            starts += [j * split for j in range(k)] + [-1 - j for j in range(rq)]
        self.split, self.n, self.max_count, self.t, self.rq = split, len(heads), max(count), t, rq
        self.items = torch.tensor([heads, starts], dtype=torch.int32, device=device)
        self.base = torch.tensor(base, dtype=torch.int32, device=device)
        self.count = torch.tensor(count, dtype=torch.int32, device=device)


if triton is not None:
    from scbench.kernels.combine import merge_splits

    @triton.jit
    def _blk(q, acc, m, total, PK, PV, SK, SV, off, n, sbase, s_tok, pos, end, lim, cols, scale,
             D: tl.constexpr, PART: tl.constexpr, PREC: tl.constexpr):
        """Online-softmax step over virtual positions ``pos`` (< end): prefix rows below n (PART 1), suffix rows from
        n on (PART 2; own keys: n = 0), or either (PART 0, masked loads: the interpreter). Row r counts pos < lim[r]."""
        inside = pos < end
        p_off = (off + pos)[:, None].to(tl.int64) * D + cols[None, :]
        s_off = sbase + (pos - n)[:, None].to(tl.int64) * s_tok + cols[None, :]
        if PART == 1:
            k = tl.load(PK + p_off, mask=inside[:, None], other=0.0)
        elif PART == 2:
            k = tl.load(SK + s_off, mask=inside[:, None], other=0.0)
        else:
            in_pre, in_suf = inside & (pos < n), inside & (pos >= n)
            k = tl.load(PK + p_off, mask=in_pre[:, None], other=0.0) + tl.load(SK + s_off, mask=in_suf[:, None],
                                                                               other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        sc = tl.where(inside[None, :] & (pos[None, :] < lim[:, None]), sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        if PART == 1:
            v = tl.load(PV + p_off, mask=inside[:, None], other=0.0)
        elif PART == 2:
            v = tl.load(SV + s_off, mask=inside[:, None], other=0.0)
        else:
            v = tl.load(PV + p_off, mask=in_pre[:, None], other=0.0) + tl.load(SV + s_off, mask=in_suf[:, None],
                                                                               other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return acc, m_new, total * alpha + tl.sum(p, 1)

    @triton.jit(do_not_specialize=["T", "C", "W", "split", "s_head", "s_tok"])
    def _ragged_shared_kernel(Q, PK, PV, Off, Len, SK, SV, SufLen, OK, OV, OAt, Items, Part, Mx, Sm, scale, T, C, W,
                              split, s_head, s_tok, B, HKV: tl.constexpr, G: tl.constexpr, RT: tl.constexpr,
                              D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, DYN: tl.constexpr,
                              SPLIT_I: tl.constexpr, OWN_CAP: tl.constexpr):
        """Program (row tile t, work item i) over query rows r = t * RT + j (request r // G, query head hh * G + r % G
        of the item's KV head hh)."""
        t, it = tl.program_id(0), tl.program_id(1)
        hh = tl.load(Items + it)
        start = tl.load(Items + W + it)
        rows = t * RT + tl.arange(0, RT)
        cols = tl.arange(0, D)
        req = rows // G
        live = req < B
        q = tl.load(Q + ((req * HKV + hh) * G + rows % G)[:, None] * D + cols[None, :], mask=live[:, None], other=0.0)
        m = tl.full([RT], -1.0e30, tl.float32)  # finite: a row with no key in a block gets weight 0, not NaN
        total = tl.zeros([RT], tl.float32)
        acc = tl.zeros([RT, D], tl.float32)
        if start >= 0:  # a piece of the head's context: prefix rows [0, n), then suffix rows at n + j
            n = tl.load(Len + hh).to(tl.int32)
            off = tl.load(Off + hh).to(tl.int32)
            lim = tl.where(live, n + tl.load(SufLen + req, mask=live, other=0).to(tl.int32), 0)
            end = tl.minimum(start + split, n + T)
            sbase = hh.to(tl.int64) * s_head
            if DYN:
                pre_end = tl.minimum(end, n)
                for o in range(start, pre_end, BN):
                    acc, m, total = _blk(q, acc, m, total, PK, PV, SK, SV, off, n, sbase, s_tok, o + tl.arange(0, BN),
                                         pre_end, lim, cols, scale, D, 1, PREC)
                for o in range(tl.maximum(start, n), end, BN):
                    acc, m, total = _blk(q, acc, m, total, PK, PV, SK, SV, off, n, sbase, s_tok, o + tl.arange(0, BN),
                                         end, lim, cols, scale, D, 2, PREC)
            else:  # the interpreter's loops want plain ints: a constant trip count, masked
                for i in range(0, SPLIT_I, BN):
                    acc, m, total = _blk(q, acc, m, total, PK, PV, SK, SV, off, n, sbase, s_tok,
                                         start + i + tl.arange(0, BN), end, lim, cols, scale, D, 0, PREC)
        else:  # the own keys of the tile's (-1 - start)-th request (other rows stay empty)
            b = (t * RT) // G - 1 - start
            end = tl.where(b < B, tl.load(OAt + b, mask=b < B, other=-1) + 1, 0).to(tl.int32)
            lim = tl.where(req == b, end, 0)
            base = (b * HKV + hh).to(tl.int64) * C * D
            if DYN:
                for o in range(0, end, BN):
                    acc, m, total = _blk(q, acc, m, total, OK, OV, OK, OV, 0, 0, base, D, o + tl.arange(0, BN), end,
                                         lim, cols, scale, D, 2, PREC)
            else:
                for o in range(0, OWN_CAP, BN):
                    acc, m, total = _blk(q, acc, m, total, OK, OV, OK, OV, 0, 0, base, D, o + tl.arange(0, BN), end,
                                         lim, cols, scale, D, 2, PREC)
        out = (t * W + it) * RT + tl.arange(0, RT)
        tl.store(Part + out[:, None] * D + cols[None, :], acc)
        tl.store(Mx + out, m)
        tl.store(Sm + out, total)

    @triton.jit
    def _ragged_shared_merge(Part, Mx, Sm, Out, Base, Count, W, HKV: tl.constexpr, G: tl.constexpr,
                             RT: tl.constexpr, D: tl.constexpr, NS: tl.constexpr):
        """Program (KV head hh, row r): merge the head's pieces in r's tile into Out [B, HKV * G, 1, D]."""
        hh, r = tl.program_id(0), tl.program_id(1)
        first = ((r // RT) * W + tl.load(Base + hh)).to(tl.int64) * RT + r % RT
        out = ((r // G) * HKV * G + hh * G + r % G) * D
        merge_splits(Part + first * D, Mx + first, Sm + first, Out + out, tl.load(Count + hh), 0, 0, 1, RT, D, NS)


def ragged_shared_decode(q, prefix_k, prefix_v, offsets, lengths, suf_k, suf_v, suf_len, own_k, own_v, own_at,
                         work: SharedWork, scale: float | None = None, bn: int | None = None,
                         rows: int | None = None, num_warps: int = 4, dyn: bool | None = None,
                         num_stages: int | None = None) -> torch.Tensor:
    """Triton version of ``ragged_shared_attention`` (CUDA, or the interpreter on CPU tensors). offsets, lengths:
    int64 [H] on q's device; ``work``: this layer's ``SharedWork`` (same lengths, suffix rows and ``rows``).
    ``dyn``: loops to loaded bounds (default: unless interpreting; the interpreter runs them with the tests' index
    patch)."""
    b, hq, _, d = q.shape
    h = lengths.shape[0]
    g = hq // h
    t = suf_k.shape[2]
    if t == 0:  # no suffix (multi-request): never read; an empty tensor's null pointer may not pass Triton's checks
        suf_k, suf_v = prefix_k.view(1, 1, -1, d), prefix_v.view(1, 1, -1, d)
    elif suf_k.stride() != suf_v.stride() or suf_k.stride(-1) != 1:
        suf_k, suf_v = suf_k.contiguous(), suf_v.contiguous()
    own_k, own_v, q = own_k.contiguous(), own_v.contiguous(), q.contiguous()
    rt, nt, rq = tiling(b, g, rows)
    if work.t != t or work.rq != rq:
        raise ValueError(f"ragged_shared_decode: work list for {work.t} suffix rows / {work.rq} requests per tile, "
                         f"got {t} / {rq}")
    # key/value tiles of both loops (prefix, suffix) within the shared-memory budget of the ragged kernel
    tile_bn, stages = rd.tiles(d, q.element_size(), q.device.type == "cpu")
    bn, stages = tile_bn if bn is None else bn, stages if num_stages is None else num_stages
    if work.split % bn:
        raise ValueError(f"ragged_shared_decode: split {work.split} is not a multiple of the key block {bn}")
    part = torch.empty(nt * work.n * rt, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(nt * work.n * rt, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty_like(q)
    static = not (q.device.type != "cpu" if dyn is None else dyn)
    _ragged_shared_kernel[(nt, work.n)](
        q, prefix_k, prefix_v, offsets, lengths, suf_k, suf_v, suf_len, own_k, own_v, own_at, work.items, part, mx, sm,
        d**-0.5 if scale is None else scale, t, own_k.shape[2], work.n, work.split, suf_k.stride(1), suf_k.stride(2), b,
        HKV=h, G=g, RT=rt, D=d, BN=bn, PREC="ieee" if q.dtype == torch.float32 else "tf32", DYN=not static,
        SPLIT_I=work.split if static else 0, OWN_CAP=own_k.shape[2] if static else 0, num_warps=num_warps,
        num_stages=stages)
    _ragged_shared_merge[(h, b * g)](part, mx, sm, out, work.base, work.count, work.n, HKV=h, G=g, RT=rt, D=d,
                                     NS=max(16, triton.next_power_of_2(work.max_count)))
    return out
