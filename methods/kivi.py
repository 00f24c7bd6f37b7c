"""KIVI: 2- or 4-bit asymmetric quantization of the KV cache, keys per channel and values per token.

Based on Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (arXiv 2402.02750), with
SCBench's settings (2 bits, group 32, 32 most recent tokens in full precision). When compression fires, each
layer becomes a ``scbench.kv.quant.KIVILayer`` that holds the packed integers (8 // bits per byte) plus scales
and zero points in the cache dtype, and keeps the most recent ``residual`` to ``residual + group - 1`` tokens
exact; tokens appended later join the residual and are quantized a group at a time. Attention dequantizes on
use. Differences from the reference code: keys and values share one residual rule (the reference keeps 0-31
recent keys exact and exactly 32 recent values), and the last group of a value token spans the head when
head_dim < group. ``decode_cache`` picks what happens to decoded tokens. ``"quantized"`` (the KIVI paper's decode,
configs/method/kivi-paper.yaml): they join the residual and are quantized like prompt tokens; a multi-turn answer is
cropped after decoding, and where its decode quantized a group the crop returns the group's prompt tokens
de-quantized (with the group's scales), so the next turn's history depends on the answer's length
(``approximation`` says so in every run's record). ``"temp"`` (SCBench's reference, MInference's ``KiviCache`` with its temporary cache): every decoded token,
and in multi-request mode each request's prompt too, stays full precision and is dropped exactly after the answer;
the engine marks the cache before each decode and at the multi-request checkpoint (``KIVILayer.scbench_freeze``), so
the global cache holds only the prompts, quantized by the usual rule. The configs ``kivi`` and ``kivi-4bit`` use
``temp`` (faithful first); the dataclass default stays ``quantized`` because runs stored before the knob existed have
no ``decode_cache`` key and ran the paper's decode (a record rebuilt from them must keep meaning what ran).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from scbench.kv.quant import BITS, DECODE_CACHES, KIVILayer, analytic_nbytes
from scbench.methods.base import Method, positive_int


@dataclass
class KIVI(Method):
    """Packed low-bit KV cache with a full-precision recent window."""

    bits: int = 2
    """Bits per quantized key/value element: 2 or 4."""
    group: int = 32
    """Tokens per key group (per channel) and channels per value group (per token)."""
    residual: int = 32
    """Most recent tokens always kept in full precision."""
    decode_cache: str = "quantized"
    """``quantized``: decoded tokens are quantized a group at a time (the KIVI paper); ``temp``: decoded tokens (and
    multi-request prompts) stay full precision and are dropped exactly after each answer (SCBench's reference, what
    configs/method/kivi.yaml sets; the default here is what runs stored without the key ran)."""

    name: ClassVar[str] = "kivi"
    stages: ClassVar[tuple[str, ...]] = ("compression",)
    fast_decode: ClassVar[bool] = False
    """Each appended token may quantize a group of the residual: the static path needs the plugin below."""
    RESIDUAL_NOTE: ClassVar[str] = (
        "keys and values share one residual rule (residual..residual+group-1 recent tokens exact); the reference "
        "keeps 0..residual-1 recent keys and exactly residual recent values exact")
    DECODE_NOTE: ClassVar[str] = (
        ". Decoded tokens (and in multi-request each request's prompt) join the residual and are quantized a group "
        "at a time, as in the KIVI paper; SCBench's reference keeps them in a full-precision temporary cache dropped "
        "after each answer (decode_cache=temp), so in multi-turn our next turn's history can depend on the answer's "
        "length (a group cut by the crop returns de-quantized)")

    @property
    def approximation(self) -> str:  # type: ignore[override]
        """What differs from SCBench's reference: the residual rule, and with ``decode_cache=quantized`` the decode."""
        return self.RESIDUAL_NOTE + (self.DECODE_NOTE if self.decode_cache == "quantized" else "")

    def label(self) -> str:
        """``Method.label``, ``decode_cache`` left out at its default (runs from before the knob keep their label)."""
        params = {k: v for k, v in dataclasses.asdict(self).items()
                  if not (k == "decode_cache" and v == "quantized")}
        return f"{self.name}({','.join(f'{k}={v}' for k, v in params.items())})"

    @classmethod
    def budget_label(cls, knobs: dict) -> str:
        """``<bits>bit``, ``<bits>bit-temp`` with ``decode_cache=temp`` (the reference's decode: the two differ in the
        end-of-run table, whose method column shows only the name)."""
        if "bits" not in knobs:
            return super().budget_label(knobs)
        return f"{knobs['bits']}bit" + ("-temp" if knobs.get("decode_cache") == "temp" else "")

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"KIVI.bits must be one of {BITS}, got {self.bits!r}")
        positive_int(self, "group")
        positive_int(self, "residual", minimum=0)
        if self.decode_cache not in DECODE_CACHES:
            raise ValueError(f"KIVI.decode_cache must be one of {DECODE_CACHES}, got {self.decode_cache!r}")

    def promises(self, *, context_tokens, kv_heads, head_dim, elt, **_):
        """Resident bytes / a full cache right after compression: the packed layout's exact size."""
        full = 2 * kv_heads * context_tokens * head_dim * elt
        packed = analytic_nbytes(context_tokens, batch=1, heads=kv_heads, head_dim=head_dim, bits=self.bits,
                                 group=self.group, residual=self.residual, elt=elt)
        return {"kv_ratio": ("eq", packed / full)}

    def static_decoder(self):
        """The captured-step decode plugin (methods/kivi_fast.py): attention over the packed bits, the residual
        quantized inside the step."""
        from scbench.methods.kivi_fast import KIVIDecode

        return KIVIDecode(self)

    def compress_cache(self, layer_idx, keys, values, queries):
        """keys, values: [B, Hkv, n, D] -> a KIVILayer holding them packed (returned instead of tensors)."""
        return KIVILayer(keys, values, bits=self.bits, group=self.group, residual=self.residual,
                         decode_cache=self.decode_cache)

    def batch_decoder(self):
        """The batched decode (methods/kivi_batch.py): the context's chunks de-quantised once for the batch, each
        row's own tokens as its sequential decode attends them, its flushes between steps. ``SCBENCH_KIVI_BATCH=0``
        turns it off (KIVI then decodes one turn at a time under ``timing=batched``)."""
        import os

        if os.environ.get("SCBENCH_KIVI_BATCH", "1") == "0":
            return None
        from scbench.methods.kivi_batch import KIVIBatch

        return KIVIBatch(self)
