"""Split decode attention for a host-memory KV tier: the accelerator attends over a static row pattern it keeps
(the first ``n_init`` rows and the last ``n_local``), the host over rows it picks itself, and the two partial
results (output + log-sum-exp per query head) are merged exactly (RetrievalAttention's CPU/GPU split, arXiv
2409.10516 §4). ``DeviceWindow`` keeps the static rows on the accelerator as a ``TieredLayer`` grows and crops;
``partial_attention`` and ``merge`` are the two halves of one softmax.
"""
from __future__ import annotations

import torch


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """q [B, Hq, D]; k, v [B, Hkv, S, D] (S >= 1) -> (out [B, Hq, D] float32, softmax over the S rows; lse [B, Hq])."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    s = (q.reshape(b, hkv, hq // hkv, d).float() @ k.float().transpose(-1, -2)) * scale  # [B, Hkv, rep, S]
    lse = s.logsumexp(-1, keepdim=True)
    out = (s - lse).exp() @ v.float()
    return out.reshape(b, hq, d), lse.reshape(b, hq)


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Two partial softmaxes over disjoint row sets -> the softmax over their union: out [B, Hq, D], lse [B, Hq]
    (float32; ``lse_b`` may be -inf: no rows). ``lse_a`` must be finite."""
    top = torch.maximum(lse_a, lse_b)
    wa, wb = (lse_a - top).exp(), (lse_b - top).exp()
    return (out_a * wa.unsqueeze(-1) + out_b * wb.unsqueeze(-1)) / (wa + wb).unsqueeze(-1)


class DeviceWindow:
    """The static rows of a ``TieredLayer`` on its compute device: an ``n_init``-row buffer holding rows
    [0, min(n_init, n)) and a tail buffer holding rows [t0, n) with t0 <= max(n_init, n - n_local), compacted when
    it holds ``n_local`` + slack rows. Appends come from the compute device (no bus crossing); a crop below what
    the tail holds, or a long append (a later prefill), drops the window, which is rebuilt from the host rows on
    the next ``rows`` call (counted as loaded bytes)."""

    def __init__(self, n_init: int, n_local: int):
        self.n_init, self.n_local = n_init, n_local
        self.slack = max(64, n_local)
        self.valid = False
        self.init_k = self.init_v = self.tail_k = self.tail_v = None
        self.have = self.t0 = self.count = 0

    def build(self, keys: torch.Tensor, values: torch.Tensor, device: torch.device) -> int:
        """Copy the static rows of the layer's rows ``keys``, ``values`` [B, Hkv, n, D] (host, or the device right
        after the prefill) to ``device``; returns the bytes copied."""
        b, h, n, d = keys.shape
        self.have = min(self.n_init, n)
        self.init_k = torch.empty((b, h, self.n_init, d), dtype=keys.dtype, device=device)
        self.init_v = torch.empty_like(self.init_k)
        self.init_k[..., : self.have, :] = keys[..., : self.have, :]
        self.init_v[..., : self.have, :] = values[..., : self.have, :]
        self.t0 = max(self.n_init, n - self.n_local) if n > self.n_init else n
        self.tail_k = torch.empty((b, h, self.n_local + self.slack, d), dtype=keys.dtype, device=device)
        self.tail_v = torch.empty_like(self.tail_k)
        self.count = n - self.t0
        self.tail_k[..., : self.count, :] = keys[..., self.t0 : n, :]
        self.tail_v[..., : self.count, :] = values[..., self.t0 : n, :]
        self.valid = True
        return 2 * (self.have + self.count) * b * h * d * keys.element_size()

    def append(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """k, v [B, Hkv, t, D] on the compute device, appended to the layer which now holds ``n`` rows."""
        t = k.shape[-2]
        if not self.valid or self.t0 + self.count + t != n or t > self.n_local:
            self.valid = False  # out of step or a long append: rebuilt from the host rows when next needed
            return
        fill = min(t, self.n_init - self.have)
        if fill:  # a short context: the first rows are still filling (then t0 = have and the tail is empty)
            self.init_k[..., self.have : self.have + fill, :] = k[..., :fill, :]
            self.init_v[..., self.have : self.have + fill, :] = v[..., :fill, :]
            self.have += fill
            self.t0 += fill
            k, v, t = k[..., fill:, :], v[..., fill:, :], t - fill
        if self.count + t > self.tail_k.shape[-2]:  # compact: keep the rows of [max(n_init, n - n_local), n)
            drop = max(self.n_init, n - self.n_local) - self.t0
            kept = self.count - drop
            self.tail_k[..., :kept, :] = self.tail_k[..., drop : self.count, :].clone()
            self.tail_v[..., :kept, :] = self.tail_v[..., drop : self.count, :].clone()
            self.t0, self.count = self.t0 + drop, kept
        self.tail_k[..., self.count : self.count + t, :] = k
        self.tail_v[..., self.count : self.count + t, :] = v
        self.count += t

    def crop(self, n: int) -> None:
        if not self.valid:
            return
        if n <= self.n_init:  # every row left is in the first buffer
            self.have = min(self.have, n)
            self.t0, self.count = n, 0
        elif self.t0 > max(self.n_init, n - self.n_local) or n < self.t0:
            self.valid = False
        else:
            self.count = n - self.t0

    def rows(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The static rows [0, min(n_init, n)) and [max(n_init, n - n_local), n), [B, Hkv, S, D] on the device."""
        if not self.valid:
            layer.loaded_bytes += self.build(layer.keys, layer.values, layer.compute)
        start = min(max(self.n_init, layer.n - self.n_local) - self.t0, self.count)
        tk, tv = self.tail_k[..., start : self.count, :], self.tail_v[..., start : self.count, :]
        if self.have == 0:
            return tk, tv
        return (torch.cat([self.init_k[..., : self.have, :], tk], dim=-2),
                torch.cat([self.init_v[..., : self.have, :], tv], dim=-2))

    def nbytes(self) -> int:
        """Accelerator bytes of the buffers (allocated capacity: both are small and fixed)."""
        if not self.valid:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.init_k, self.init_v, self.tail_k, self.tail_v))
