"""GPU path of the sparse prefill patterns: FlexAttention with block masks built analytically.

The block mask is computed from the pattern's lines in O(P x Q-blocks x KV-blocks) (no T x T mask is ever
evaluated): a block is skipped when no chosen column or diagonal crosses it, computed without ``mask_mod``
when every cell is causal and chosen (full block), and masked cell by cell otherwise. Two pieces run
outside the block-sparse call because one 128-row tile per head would otherwise walk every key block
alone: the dense last rows (Tri-shape) go through dense SDPA and overwrite those rows, and scattered key
columns (vertical-slash), which would touch nearly every key block, are gathered into a small per-head key
set, attended in a second FlexAttention call, and merged by log-sum-exp. On CUDA both calls' ordered block
lists come from one Triton launch each (``block_lists``; ``main_lists`` / ``gathered_lists`` keep the torch
classification as the reference and the CPU path). Tested against ``scbench.kernels.pattern.reference_attention``
(tests/gpu/test_sparse_gpu.py).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from scbench.kernels import block_lists
from scbench.kernels.paged_decode import triton_on
from scbench.kernels.pattern import Pattern

BLOCK = 128
DYNAMIC: bool | None = None
"""torch.compile's ``dynamic`` for FlexAttention: None (default) recompiles once, then with dynamic lengths;
False compiles one kernel per length: about 15% faster kernels (A-shape at 128K on an H100: 21.4 vs 25.2 ms,
results/perf/sparse_prefill_attention.md) for a compile per new prompt length. Set it before the first call."""
KERNEL_OPTIONS: dict = {"USE_TMA": True}
"""FlexAttention ``kernel_options`` of every call. ``USE_TMA`` (Hopper's tensor memory accelerator; ignored where
unsupported): A-shape at 128K on an H100 ~4.5% faster (scripts/probe_flex_ashape.py,
results/perf/sparse_flex_options.json). ``ROWS_GUARANTEED_SAFE`` is not usable here: it produced NaN on the
A-shape mask (a row with no key inside a visited block), although every row has a key overall."""
_COMPILED: dict = {}


def compiled_flex():
    """torch.compile(flex_attention) for the current ``DYNAMIC`` setting, built once."""
    if DYNAMIC not in _COMPILED:
        cfg = torch._dynamo.config  # one graph per mask_mod family and length: stay under the limit
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        _COMPILED[DYNAMIC] = torch.compile(flex_attention, dynamic=DYNAMIC)
    return _COMPILED[DYNAMIC]


def _ordered(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [P, nq, nk] -> (counts [1, P, nq], indices [1, P, nq, nk]) with the chosen blocks first.

    A stable argsort: on an H100, 0.73 ms for 32 x 1024 x 1024 blocks vs 1.03 ms for prefix sums + scatter
    (results/perf/sparse_flex_options.json)."""
    num = m.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None], idx[None]


def _from_kv_blocks(kn, ki, fn, fi, *, mask_mod, seq_lengths) -> BlockMask:
    """BlockMask from ordered block lists, skipping the transposed (backward-only) lists where supported."""
    kw = dict(BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=seq_lengths)
    try:
        return BlockMask.from_kv_blocks(kn, ki, fn, fi, compute_q_blocks=False, **kw)
    except TypeError:
        return BlockMask.from_kv_blocks(kn, ki, fn, fi, **kw)


def _i32(x: int, device) -> torch.Tensor:
    """A 0-dim int32 constant for a cell test, filled on the device (no host-to-device copy)."""
    return torch.full((), x, dtype=torch.int32, device=device)


def _mask_mod(pattern: Pattern):
    """Cell predicate of the pattern's sparse rows (tables captured as tensors, indices clamped, int32 arithmetic:
    FlexAttention's indices are int32 and an int64 constant would widen every cell's arithmetic)."""
    dev = pattern.cols.device
    off, last = _i32(pattern.offset, dev), _i32(pattern.tk - 1, dev)
    if pattern.band is not None:  # arithmetic test: ~15% faster than table reads at 128K (probe_flex_ashape.py)
        n_init, n_local = pattern.band

        def mask_mod(b, h, q_idx, kv_idx):
            d = q_idx + off - kv_idx
            return (d >= 0) & ((kv_idx < n_init) | (d < n_local))

        return mask_mod
    cols, diags = pattern.cols, pattern.diags
    one, no_cols = pattern.heads == 1, pattern.no_cols

    def mask_mod(b, h, q_idx, kv_idx):
        hh = 0 if one else h
        d = q_idx + off - kv_idx
        on = diags[hh, torch.clamp(torch.minimum(d, last), min=0)]
        if not no_cols:
            on = on | cols[hh, torch.minimum(kv_idx, last)]
        return (d >= 0) & on

    return mask_mod


@functools.lru_cache(maxsize=64)
def causal_blocks(tq: int, tk: int) -> int:
    """BLOCK x BLOCK blocks that the bottom-right-aligned causal score matrix touches (one head)."""
    nq, nk, off = -(-tq // BLOCK), -(-tk // BLOCK), tk - tq
    return sum(min(nk, (off + min((i + 1) * BLOCK, tq) - 1) // BLOCK + 1) for i in range(nq))


def block_density(bm: BlockMask, tq: int, tk: int) -> float:
    """Visited blocks (partial + full) / causal blocks, over the mask's heads (a broadcast mask counts once); reads
    the counts back (one host synchronisation)."""
    visited = bm.kv_num_blocks.sum() + (bm.full_kv_num_blocks.sum() if bm.full_kv_num_blocks is not None else 0)
    return float(visited) / (causal_blocks(tq, tk) * bm.kv_num_blocks.shape[1])


def _count(cum: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Selected lines in [lo, hi) per head. cum: [P, T+1] prefix sums; lo, hi: [nq, nk] or [P, nq, nk]."""
    t = cum.shape[-1] - 1
    lo, hi = lo.clamp(0, t), hi.clamp(0, t)
    if lo.dim() == 2:
        return cum[:, hi] - cum[:, lo]
    p = cum.shape[0]
    return cum.gather(1, hi.reshape(p, -1)).view_as(hi) - cum.gather(1, lo.reshape(p, -1)).view_as(lo)


def main_lists(pattern: Pattern, kernel: bool | None = None):
    """Ordered (partial, full) block lists of the pattern's sparse rows, columns included: (kn [1, P, nq],
    ki [1, P, nq, nk], fn, fi), int32. ``kernel``: the one-launch Triton build (``block_lists``; default on CUDA) or
    the torch reference (dense [P, nq, nk] classification + stable argsorts)."""
    tq, tk, off = pattern.tq, pattern.tk, pattern.offset
    dev = pattern.cols.device
    nq, nk = math.ceil(tq / BLOCK), math.ceil(tk / BLOCK)
    kb = torch.arange(nk, device=dev)[None, :]
    jmin, jmax = kb * BLOCK, (kb * BLOCK + BLOCK - 1).clamp(max=tk - 1)
    cum_d = pattern.prefix("diags")
    n_c = _count(pattern.prefix("cols"), jmin, jmax + 1)  # [P, 1, nk]: columns do not depend on the row block
    if kernel if kernel is not None else triton_on(pattern.cols):
        p = pattern.heads
        flat = [x.expand(p, nk) for x in (jmin, jmax, (kb + 1) * BLOCK <= tk)]
        return block_lists.block_lists(cum_d, *flat, n_c[:, 0] > 0, n_c[:, 0] == jmax - jmin + 1, tq=tq, off=off,
                                       nq=nq, block=BLOCK, gathered=False)
    qb = torch.arange(nq, device=dev)[:, None]
    pmin, pmax = qb * BLOCK + off, (qb * BLOCK + BLOCK - 1).clamp(max=tq - 1) + off
    dmin, dmax = pmin - jmax, pmax - jmin  # diagonals crossing the block
    any_causal, all_causal = dmax >= 0, dmin >= 0
    n_d = _count(cum_d, dmin, dmax + 1)
    whole = ((qb + 1) * BLOCK <= tq) & ((kb + 1) * BLOCK <= tk)  # edge blocks stay partial
    full = whole & all_causal & ((n_d == dmax - dmin + 1) | (n_c == jmax - jmin + 1))
    partial = any_causal & ((n_d > 0) | (n_c > 0)) & ~full
    return (*_ordered(partial), *_ordered(full.expand_as(partial)))


def block_mask(pattern: Pattern) -> BlockMask:
    """BlockMask ([1, P, ...]; P=1 broadcasts over heads) of the pattern's sparse rows, columns included.

    The dense last rows (``n_last``) are not in it: ``attention`` computes them separately.
    """
    return _from_kv_blocks(*main_lists(pattern), mask_mod=_mask_mod(pattern), seq_lengths=(pattern.tq, pattern.tk))


def _flex_lse(q, k, v, bm: BlockMask | None, scale, gqa: bool, **options):
    """(out [B, Hq, Tq, D], natural-log LSE [B, Hq, Tq] float32; -inf on rows with no key)."""
    out, aux = compiled_flex()(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True),
                               kernel_options={**KERNEL_OPTIONS, **options} or None)
    return out, aux.lse


def gather_cols(k, v, pattern: Pattern, hq: int):
    """Each query head's own columns: (n, the most columns of a head; pos [Hq, n], sorted positions, 0 in padding
    slots; valid [Hq, n]; keys and values [B, Hq, n, D] at those positions)."""
    hkv, tk, dev = k.shape[1], pattern.tk, k.device
    cols = pattern.cols.expand(hq, -1) if pattern.heads == 1 else pattern.cols
    n = int(cols.sum(-1).max())
    pos = torch.where(cols, torch.arange(tk, device=dev), tk).sort(-1).values[:, :n]  # sorted, tk = padding
    valid = pos < tk
    pos = torch.where(valid, pos, 0)
    kv_head = (torch.arange(hq, device=dev) // (hq // hkv))[:, None]
    return n, pos, valid, k[:, kv_head, pos], v[:, kv_head, pos]


def _gathered_cols(q, k, v, pattern: Pattern, scale):
    """Attention of every query head to its own scattered columns, minus cells on chosen diagonals."""
    tq, tk, off = pattern.tq, pattern.tk, pattern.offset
    dev = q.device
    n, pos, valid, kg, vg = gather_cols(k, v, pattern, q.shape[1])
    t_off, t_last, t_n = (_i32(x, dev) for x in (off, tk - 1, n - 1))
    # int32 positions, a padding slot far right of every query (so the causal test rejects it: no validity table)
    far = torch.where(valid, pos, 2**30).to(torch.int32)
    dtab, one = pattern.diags, pattern.heads == 1

    def mask_mod(b, h, q_idx, kv_idx):
        t = torch.minimum(kv_idx, t_n)
        d = q_idx + t_off - far[h, t]
        return (d >= 0) & ~dtab[0 if one else h, torch.clamp(torch.minimum(d, t_last), min=0)]

    kn, ki, fn, fi = gathered_lists(pattern, pos, valid, n)
    bm = _from_kv_blocks(kn, ki, fn, fi, mask_mod=mask_mod, seq_lengths=(tq, n))
    return _flex_lse(q, kg, vg, bm, scale, False)


def gathered_lists(pattern: Pattern, pos: torch.Tensor, valid: torch.Tensor, n: int, kernel: bool | None = None):
    """Ordered (partial, full) block lists of the gathered-columns call: query blocks x blocks of ``n`` gathered
    slots per head (pos [Hq, n]: sorted column positions, 0 where not ``valid``). A block is full where every slot
    is valid, causal for every row and on no chosen diagonal; padding-only blocks are skipped. ``kernel``: as in
    ``main_lists``."""
    tq, off = pattern.tq, pattern.offset
    dev = pos.device
    cum_d = pattern.prefix("diags")
    cum_d = cum_d.expand(pos.shape[0], -1) if pattern.heads == 1 else cum_d
    nq, nk = math.ceil(tq / BLOCK), math.ceil(n / BLOCK)
    starts = torch.arange(nk, device=dev) * BLOCK
    ends = (starts + BLOCK - 1).clamp(max=n - 1)
    jmin, jmax = pos[:, starts], pos[:, ends]  # [Hq, nk]
    all_valid = valid[:, ends] & (ends - starts + 1 == BLOCK)
    if kernel if kernel is not None else triton_on(pos):
        return block_lists.block_lists(cum_d, jmin, jmax, all_valid, valid[:, starts], None, tq=tq, off=off, nq=nq,
                                       block=BLOCK, gathered=True)
    qb = torch.arange(nq, device=dev)
    pmin, pmax = qb * BLOCK + off, (qb * BLOCK + BLOCK - 1).clamp(max=tq - 1) + off
    dmin = pmin[None, :, None] - jmax[:, None, :]  # [Hq, nq, nk]
    dmax = pmax[None, :, None] - jmin[:, None, :]
    n_d = _count(cum_d, dmin, dmax + 1)
    full = (dmin >= 0) & (n_d == 0) & all_valid[:, None, :] & ((qb + 1) * BLOCK <= tq)[None, :, None]
    partial = (dmax >= 0) & valid[:, starts][:, None, :] & ~full  # padding-only blocks (fewer columns) skipped
    return (*_ordered(partial), *_ordered(full))


def _merge(out1, lse1, out2, lse2):
    """Combine two attentions over disjoint key sets by their log-sum-exps (rows of out2 may have no key)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse)[..., None]
    w2 = torch.where(torch.isfinite(lse2), torch.exp(lse2 - lse), 0.0)[..., None]
    return (out1.float() * w1 + torch.nan_to_num(out2.float()) * w2).to(out1.dtype)


def _compiled(fn):
    """fn fused by torch.compile (one kernel instead of a chain of full-size temporaries), built once."""
    key = (fn, DYNAMIC)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=DYNAMIC)
    return _COMPILED[key]


SPLIT_SEGMENT = 4096
"""Dense last rows (fewer than ``BLOCK``) split the keys into segments of this many, one FlexAttention batch
entry each, merged by log-sum-exp: one SDPA call gives each head's few rows to a single thread block walking
every key (3 ms of Tri-shape's time at 128K). FlexAttention's own decoding kernel does not build for these
shapes on torch 2.11 (64 rows x 4 query heads per KV head x d=128: no valid config)."""


@functools.lru_cache(maxsize=8)
def rows_block_mask(tq: int, tk: int, device) -> BlockMask:
    """BlockMask of ``tq`` (< 128) bottom-right-aligned causal rows over ``tk`` keys: full blocks up to the
    first row's position, masked blocks after."""
    off = tk - tq
    nk = math.ceil(tk / BLOCK)
    kb = torch.arange(nk, device=device)
    full = ((kb + 1) * BLOCK - 1 <= off)[None, None]
    t_off = torch.tensor(off, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx + t_off >= kv_idx

    kn, ki = _ordered(~full)
    fn, fi = _ordered(full)
    return _from_kv_blocks(kn, ki, fn, fi, mask_mod=mask_mod, seq_lengths=(tq, tk))


def split_rows(q, k, v, scale, segment: int | None = None) -> torch.Tensor:
    """Causal attention of the last rows to every key, keys split in segments. q: [1, Hq, R, D] (R < 128);
    k, v: [1, Hkv, Tk, D] -> [1, Hq, R, D]. Segments wholly before the first row are one batched call without a
    mask; the rest (the causal tail) one masked call."""
    tq, tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    segment = segment or SPLIT_SEGMENT
    n = (tk - tq) // segment  # segments every row sees whole (the tail keeps >= R keys)
    force = {"FORCE_USE_FLEX_ATTENTION": True}  # the decoding kernel would be picked for < 128 rows
    outs, lses = [], []
    if n:
        kk, vv = (x[0, :, : n * segment].unflatten(1, (n, segment)).transpose(0, 1) for x in (k, v))
        o, lse = _flex_lse(q.expand(n, -1, -1, -1).contiguous(), kk, vv, None, scale, gqa, **force)
        outs.append(o)
        lses.append(lse)
    tail = tk - n * segment
    o, lse = _flex_lse(q, k[:, :, n * segment :], v[:, :, n * segment :], rows_block_mask(tq, tail, q.device),
                       scale, gqa, **force)
    outs.append(o)
    lses.append(lse)
    return _compiled(_merge_segments)(torch.cat(outs), torch.cat(lses))


def _merge_segments(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """[S, H, R, D] partial attentions with their LSEs [S, H, R] -> [1, H, R, D] (every row has a key)."""
    w = torch.softmax(lse, 0)[..., None]
    return (out.float() * w).sum(0, keepdim=True).to(out.dtype)


def _dense_rows(q, k, v, scale) -> torch.Tensor:
    """Causal attention of the last rows to every key (bottom-right aligned). q: [B, Hq, R, D] -> same shape."""
    tq, tk = q.shape[-2], k.shape[-2]
    if q.shape[0] == 1 and tq < BLOCK and tk >= 2 * SPLIT_SEGMENT:
        return split_rows(q, k, v, scale)
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def attention(q, k, v, pattern: Pattern, scale: float | None = None, bm: BlockMask | None = None) -> torch.Tensor:
    """FlexAttention over the pattern. q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] -> [B, Hq, Tq, D].

    ``bm``: a prebuilt ``block_mask`` of the pattern's main part (shared by every layer, e.g.); built when None.
    """
    r0 = pattern.row0
    if r0 == 0:
        return _dense_rows(q, k, v, scale)
    gqa = q.shape[1] != k.shape[1]
    if not pattern.scattered_cols:
        out, _ = _flex_lse(q, k, v, bm if bm is not None else block_mask(pattern), scale, gqa)
    else:
        out1, lse1 = _flex_lse(q, k, v, bm if bm is not None else block_mask(pattern.diagonals_only()), scale, gqa)
        out2, lse2 = _gathered_cols(q, k, v, pattern, scale)
        out = _compiled(_merge)(out1, lse1, out2, lse2)
    if r0 < pattern.tq:
        out[:, :, r0:] = _dense_rows(q[:, :, r0:], k, v, scale)
    return out
