"""The engine interface: what the runner needs from a model runtime."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class FeedStats:
    tokens: int
    """Tokens forwarded."""
    reused: int
    """Tokens already in the cache (served without recomputation)."""
    seconds: float
    compress_s: float = 0.0
    attn_cells: int = 0
    """Causal attention score cells of this feed's multi-token forwards (all layers, heads, batch rows)."""
    attn_computed: int = 0
    """Of those, the cells computed (fewer than attn_cells under sparse prefill)."""
    prefill_shared: int = 1
    """Runs whose first prefill this feed's was (a grouped sweep's fork, scbench/engines/fork.py); 1: its own."""
    scores_shared: int = 1
    """Runs that shared this feed's compression scores (equal ``Method.score_key()`` after one shared prefill,
    scbench/engines/score_memo.py ``ScoreMemo``); 1: scored alone."""

    @property
    def attn_density(self) -> float:
        """Fraction of the causal score matrix computed (1.0 when nothing was counted)."""
        return self.attn_computed / self.attn_cells if self.attn_cells else 1.0


@dataclass
class GenResult:
    tokens: list[int]
    text: str
    first_token_s: float
    """Time to pick the first token from the prefill logits."""
    decode_s: float
    """Time for the remaining tokens."""
    stopped: bool = field(default=False)
    """True when a stop token ended generation (False: max_new_tokens reached)."""
    decode_path: str = "plain"
    """Which decode loop ran: ``plain`` (reference), ``static`` or ``graph`` (scbench/engines/fastdecode.py)."""
    compress_s: float = 0.0
    """Time of the compressions that fired during decoding (policy ``decode_every``)."""
    warmup_s: float = 0.0
    """One-time work during this generation (kernel compilation, CUDA-graph capture), not in ``decode_s``."""


class Session(ABC):
    """The KV state of one example. Created by ``Engine.session``."""

    @abstractmethod
    def feed(self, ids: list[int], *, compress: bool, sparse: bool) -> FeedStats:
        """Forward ``ids`` on top of the cache; optionally let the method compress afterwards and use
        its sparse prefill hook during the forward."""

    @abstractmethod
    def generate(self, max_new_tokens: int) -> GenResult:
        """Greedy decode from the last fed position; generated tokens stay in the cache until dropped."""

    @abstractmethod
    def drop_last(self, n: int) -> None:
        """Forget the last n positions (e.g. generated tokens replaced by the golden answer)."""

    @abstractmethod
    def checkpoint(self, *, rewrites: bool) -> object:
        """A token to come back to; ``rewrites`` says later steps may rewrite (not only append to) the cache."""

    @abstractmethod
    def rollback(self, token: object) -> None: ...

    @abstractmethod
    def memory(self) -> dict:
        """kv_bytes, kv_tokens, kv_full_bytes, slow_tier_bytes, loaded_bytes, peak_mem_bytes."""


class Engine(ABC):
    name: str = "base"
    exclusive: bool = False
    """Only one engine of this class may live in a process (it reserves its device): opening another closes it."""

    @classmethod
    def from_config(cls, model: dict, options: dict | None = None) -> "Engine":
        """The engine for a model config (``configs/model/*.yaml``) and engine options (``configs/engine/<name>.yaml``
        less ``name``, plus the method's ``engine_args()``); unknown keys are a ValueError naming them."""
        raise NotImplementedError(f"engine {cls.name!r} cannot be built from a config")

    def close(self) -> None:
        """Release what the engine holds beyond memory (processes, files); the default holds nothing."""

    @abstractmethod
    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str: ...

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @property
    @abstractmethod
    def window(self) -> int:
        """Positions the model supports."""

    @abstractmethod
    def session(self, method) -> Session: ...

    @abstractmethod
    def describe(self) -> dict:
        """Model id, dtype, device, chat-template hash, ... (stored with every run)."""


def cache_kw(module) -> str:
    """The name ``module.forward`` takes the KV cache under: ``cache`` from transformers 5.24 on (where
    ``past_key_values`` is a deprecated alias that warns), ``past_key_values`` before (5.17 on the GPU box)."""
    import inspect

    cls = type(module)
    if cls not in _CACHE_KW:
        _CACHE_KW[cls] = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    return _CACHE_KW[cls]


_CACHE_KW: dict[type, str] = {}
