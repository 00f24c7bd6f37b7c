"""Full attention: the dense baseline. The KV cache keeps every token; no hook fires."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from scbench.methods.base import Method


@dataclass
class FullAttention(Method):
    """Dense attention with a full O(n) KV cache (the reference point of every comparison)."""

    name: ClassVar[str] = "full"
    stages: ClassVar[tuple[str, ...]] = ()
    engines: ClassVar[tuple[str, ...]] = ("hf", "vllm")
