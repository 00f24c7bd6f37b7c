"""Packed low-bit KV storage for KIVI: group quantization, bit packing and a cache layer that holds packed bytes.

Asymmetric (min/max) quantization: ``x ~ q * scale + zero`` with ``q`` in ``[0, 2**bits - 1]``, one (scale, zero)
pair per group. Keys are quantized per channel (a group is ``group`` consecutive tokens of one channel) and values
per token (a group is ``group`` consecutive channels of one token), as in KIVI. The integers are packed along the
channel axis, ``8 // bits`` to a uint8, so the bytes held are the real 2- or 4-bit bytes plus the scales and zero
points (kept in the cache dtype).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from scbench.kv.cache import CacheLayer, SessionOnly

BITS = (2, 4)
DECODE_CACHES = ("quantized", "temp")
"""KIVI's ``decode_cache`` values: decoded tokens quantized a group at a time, or kept full precision (``KIVILayer``)."""


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: uint8 [..., D] with values < 2**bits, D a multiple of 8 // bits -> uint8 [..., D * bits // 8].

    Element ``i * per + j`` of a row (``per = 8 // bits``) sits in bits ``j * bits ...`` of byte ``i``.
    """
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
    return (q.unflatten(-1, (q.shape[-1] // per, per)) << shifts).sum(-1, dtype=torch.uint8)


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: uint8 [..., D * bits // 8] -> uint8 [..., D]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=p.device)
    return ((p.unsqueeze(-1) >> shifts) & (2**bits - 1)).flatten(-2)


def _grouped(x: torch.Tensor, group: int, axis: int) -> torch.Tensor:
    """[B, H, T, D] -> groups on a new last-but-one (axis=-2, per channel) or last (axis=-1, per token) dim."""
    if axis == -2:
        return x.unflatten(-2, (x.shape[-2] // group, group))  # [B, H, T/G, G, D]: reduce dim -2
    return x.unflatten(-1, (x.shape[-1] // group, group))  # [B, H, T, D/G, G]: reduce dim -1


def quantize(x: torch.Tensor, bits: int, group: int, axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-quantize and pack.

    Args:
        x: [B, H, T, D]; T % group == 0 when axis == -2 (keys, per channel), D % group == 0 when axis == -1
            (values, per token).
    Returns:
        packed uint8 [B, H, T, D * bits // 8]; scale and zero in x.dtype, [B, H, T/G, D] (axis -2) or
        [B, H, T, D/G] (axis -1).
    """
    levels = 2**bits - 1
    xg = _grouped(x.float(), group, axis)
    red = -2 if axis == -2 else -1
    lo, hi = xg.amin(red, keepdim=True), xg.amax(red, keepdim=True)
    # Round the parameters to the storage dtype first, so q is computed against what dequantize will use.
    zero = lo.to(x.dtype).float()
    scale = ((hi - zero) / levels).to(x.dtype).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((xg - zero) / safe).round_().clamp_(0, levels).to(torch.uint8)
    q = q.flatten(-3, -2) if axis == -2 else q.flatten(-2)
    return pack(q, bits), scale.squeeze(red).to(x.dtype), zero.squeeze(red).to(x.dtype)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, axis: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize`` up to the rounding error (at most scale / 2 per element) -> [B, H, T, D] in dtype."""
    q = _grouped(unpack(packed, bits).float(), group, axis)
    red = -2 if axis == -2 else -1
    x = q * scale.float().unsqueeze(red) + zero.float().unsqueeze(red)
    return (x.flatten(-3, -2) if axis == -2 else x.flatten(-2)).to(dtype)


def value_group(group: int, head_dim: int) -> int:
    """Channels per value group: ``group``, or the whole head when the head is smaller."""
    g = min(group, head_dim)
    if head_dim % g:
        raise ValueError(f"KIVI: head_dim {head_dim} is not a multiple of the group size {g}")
    return g


def analytic_nbytes(tokens: int, *, batch: int, heads: int, head_dim: int, bits: int, group: int, residual: int,
                    elt: int, quant: int | None = None) -> int:
    """Bytes one ``KIVILayer`` holds for ``tokens`` tokens (keys + values, packed data + scales + zeros + residual),
    ``quant`` of them packed (default: as many as tokens appended to an empty layer leave packed)."""
    quant = max(0, (tokens - residual) // group) * group if quant is None else quant
    rest = tokens - quant
    gv = value_group(group, head_dim)
    packed = 2 * batch * heads * quant * head_dim * bits // 8
    key_params = 2 * batch * heads * (quant // group) * head_dim * elt
    value_params = 2 * batch * heads * quant * (head_dim // gv) * elt
    return packed + key_params + value_params + 2 * batch * heads * rest * head_dim * elt


class KIVILayer(SessionOnly, DynamicLayer, CacheLayer):
    """A cache layer holding old tokens as packed low-bit groups and the most recent ones in full precision.

    ``keys`` / ``values`` are the full-precision residual [B, H, r, D]; the quantized prefix lives in lists of
    chunks (packed, scale, zero) that are only ever appended to or replaced, never written in place, so a
    snapshot is a set of references. Invariant after every update: ``residual <= r < residual + group`` once the
    layer holds at least ``residual`` tokens: new tokens join the residual and each time ``group`` tokens beyond
    the residual have gathered they are quantized as one group. ``update`` dequantizes on use: attention sees the
    dequantized prefix followed by the exact residual.

    ``decode_cache="temp"`` (SCBench's reference ``KiviCache``): ``scbench_freeze`` sets a marker (``frozen``, a
    token count); tokens at or after it are never quantized (they stay in the residual, full precision) and the
    residual rule counts only the tokens before it, so ``scbench_crop(n)`` with ``n >= frozen`` is exact: the layer
    is then what it was when the marker was set. ``scbench_thaw`` clears it. With ``"quantized"`` (default) both
    are no-ops.
    """

    scbench_compresses_itself = True
    """The engine does not call the method's compression hook again on this layer."""
    scbench_exact_crop = False
    """Cropping into quantized groups cannot restore the original values: checkpoints take snapshots."""
    scbench_row_state = True
    """A batched decode keeps each row's state (``scbench_snapshot``) for the method's plugin (methods/kivi_batch.py)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, *, bits: int, group: int, residual: int,
                 decode_cache: str = "quantized"):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"KIVI bits must be one of {BITS}, got {bits}")
        if decode_cache not in DECODE_CACHES:
            raise ValueError(f"KIVI decode_cache must be one of {DECODE_CACHES}, got {decode_cache!r}")
        self.decode_cache = decode_cache
        self.frozen: int | None = None
        """Tokens after which nothing is quantized (``decode_cache="temp"`` only; None: no marker)."""
        head_dim = keys.shape[-1]
        if head_dim * bits % 8:
            raise ValueError(f"KIVI: head_dim {head_dim} cannot be packed at {bits} bits")
        self.bits, self.group, self.residual = bits, group, residual
        self.value_group = value_group(group, head_dim)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.kchunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.vchunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.n_quant = 0
        self.keys, self.values = keys, values
        self._flush()

    # --- quantization ---------------------------------------------------------------------------
    def _flush(self) -> None:
        """Quantize whole groups of the residual beyond its ``residual`` most recent tokens."""
        n = self.keys.shape[-2] if self.frozen is None else min(self.keys.shape[-2], self.frozen - self.n_quant)
        m = max(0, (n - self.residual) // self.group) * self.group
        if m == 0:
            return
        self.kchunks.append(quantize(self.keys[..., :m, :], self.bits, self.group, axis=-2))
        self.vchunks.append(quantize(self.values[..., :m, :], self.bits, self.value_group, axis=-1))
        self.keys = self.keys[..., m:, :].contiguous()
        self.values = self.values[..., m:, :].contiguous()
        self.n_quant += m

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole layer as full-precision tensors [B, H, n, D]: dequantized prefix + exact residual.

        On CUDA each chunk is de-quantised by one kernel straight into the output (scbench/kernels/kivi_dequant.py,
        bit-identical to ``dequantize``); elsewhere by ``dequantize`` and a concatenation."""
        from scbench.kernels import kivi_dequant

        if not (self.keys.is_cuda and self.kchunks and kivi_dequant.usable(self.keys)):
            ks = [dequantize(*c, self.bits, self.group, -2, self.dtype) for c in self.kchunks]
            vs = [dequantize(*c, self.bits, self.value_group, -1, self.dtype) for c in self.vchunks]
            return torch.cat([*ks, self.keys], dim=-2), torch.cat([*vs, self.values], dim=-2)
        b, h, r, d = self.keys.shape
        nq = sum(c[0].shape[2] for c in self.kchunks)
        outs = []
        for chunks, resid, grp, axis in ((self.kchunks, self.keys, self.group, -2),
                                         (self.vchunks, self.values, self.value_group, -1)):
            out = resid.new_empty(b, h, nq + r, d)
            at = 0
            for packed, scale, zero in chunks:
                kivi_dequant.dequantize_into(out, at, packed, scale, zero, bits=self.bits, group=grp, axis=axis)
                at += packed.shape[2]
            out[:, :, at:] = resid
            outs.append(out)
        return outs[0], outs[1]

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states, value_states: [B, H, t, D] -> all keys/values [B, H, n + t, D] (new ones exact)."""
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        out = self.dequantized()
        self._flush()
        return out

    # --- cache-layer protocol -------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.n_quant + self.keys.shape[-2]

    def scbench_nbytes(self) -> int:
        tensors = [t for c in (*self.kchunks, *self.vchunks) for t in c] + [self.keys, self.values]
        return sum(t.numel() * t.element_size() for t in tensors)

    def scbench_slow_nbytes(self) -> int:
        return 0  # everything stays on the compute device

    def scbench_crop(self, n: int) -> None:
        """Keep the first n tokens. Tokens of a cut quantized group return to the residual dequantized."""
        if self.frozen is not None:
            self.frozen = min(self.frozen, n)
        if n >= self.n_quant:
            self.keys = self.keys[..., : n - self.n_quant, :]
            self.values = self.values[..., : n - self.n_quant, :]
            return
        keys, values = self.dequantized()
        keep = n // self.group * self.group
        kc = [torch.cat(parts, dim=-2) for parts in zip(*self.kchunks)]
        vc = [torch.cat(parts, dim=-2) for parts in zip(*self.vchunks)]
        self.kchunks = [(kc[0][..., :keep, :], kc[1][..., : keep // self.group, :], kc[2][..., : keep // self.group, :])]
        self.vchunks = [(vc[0][..., :keep, :], vc[1][..., :keep, :], vc[2][..., :keep, :])]
        self.n_quant = keep
        self.keys = keys[..., keep:n, :].contiguous()
        self.values = values[..., keep:n, :].contiguous()

    def scbench_snapshot(self) -> tuple:
        """References to the (never mutated) tensors: cheap, no copy."""
        return list(self.kchunks), list(self.vchunks), self.n_quant, self.keys, self.values, self.frozen

    def scbench_restore(self, snap: tuple) -> None:
        kc, vc, self.n_quant, self.keys, self.values, self.frozen = snap
        self.kchunks, self.vchunks = list(kc), list(vc)

    def scbench_freeze(self) -> None:
        """``decode_cache="temp"``: nothing from the current length on is ever quantized (an earlier marker stays)."""
        if self.decode_cache == "temp":
            n = self.get_seq_length()
            self.frozen = n if self.frozen is None else min(self.frozen, n)

    def scbench_thaw(self) -> None:
        """Clear the marker: later appends are quantized by the usual rule again."""
        self.frozen = None
