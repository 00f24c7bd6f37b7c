"""vLLM KV-cache quantisation: the paged KV cache stored in fp8 (``kv_cache_dtype``), everything else dense.

Based on vLLM's quantised KV cache (docs: "Quantized KV Cache"): keys and values are cast to FP8 (E4M3 or E5M2)
when written to the paged cache, with per-tensor scales of 1.0 unless the checkpoint ships calibrated ones, and
attention reads them back. It is an engine setting, not a hook: the method hands ``kv_cache_dtype`` to the vLLM
engine (``engine_args``), which therefore loads one engine per KV dtype. vLLM's CPU backend runs it only on x86
CPUs with AVX-512 or AMX; elsewhere the engine refuses it before loading (scbench/engines/vllm.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scbench.methods.base import Method

KV_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass
class VLLMKVQuant(Method):
    """Full attention over an fp8 KV cache (one byte per element instead of the model dtype's two or four)."""

    kv_cache_dtype: str = "fp8"
    """vLLM's KV cache dtype: fp8 (the platform's default FP8 format), fp8_e4m3 or fp8_e5m2."""

    name: ClassVar[str] = "vllm_kv_quant"
    stages: ClassVar[tuple[str, ...]] = ("compression",)
    engines: ClassVar[tuple[str, ...]] = ("vllm",)

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_DTYPES:
            raise ValueError(f"VLLMKVQuant.kv_cache_dtype must be one of {KV_DTYPES}, got {self.kv_cache_dtype!r}")

    def engine_args(self) -> dict:
        return {"kv_cache_dtype": self.kv_cache_dtype}
