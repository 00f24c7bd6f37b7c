"""The method API: one dataclass per method, knobs as fields, hooks for the lifecycle stages it touches.

The runner never branches on a method's class: it reads the declarations below and calls the hooks
a method overrides. Policies (when compression fires, whether the query is visible to it, whether
sparse prefill applies beyond the first prefill) belong to the runner, not to the method.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from scbench.records import Cost, TurnStats

STAGES = ("generation", "compression", "retrieval", "loading")

HOOK_COSTS: dict[str, dict[str, Cost]] = {
    "compress_context": {
        "context_rate": Cost("ratio", "prompt compression: tokens of the compressed shared context / tokens of the "
                             "original (1.0 uncompressed)", default=1.0, label="context kept"),
        "context_compress_s": Cost("s", "prompt compression: time compressing the shared context (first turn only)",
                                   default=0.0),
    },
}
"""Cost columns the runner measures around a hook, for every method that overrides it (part of its ``cost_columns``)."""


@dataclass
class Method:
    """Base class. Subclasses set ``name`` and ``stages`` and override one or more hooks."""

    name: ClassVar[str] = "base"
    stages: ClassVar[tuple[str, ...]] = ()
    engines: ClassVar[tuple[str, ...]] = ("hf",)
    """Engines the method runs on; a run asking for another engine fails before any model is loaded."""
    approximation: ClassVar[str | None] = None
    """Set when the method approximates the published one: recorded in the results next to each score."""
    query_window: ClassVar[int] = 0
    """How many of the last prompt queries per layer the compression hook wants (0: none)."""
    query_lse: ClassVar[bool] = False
    """The compression hook also reads each captured query's log-sum-exp from the dense forward, when that forward
    computed it for free (scbench/kernels/dense.causal_attention_lse): ``queries.scbench_lse`` = (lse [B, Hq, w]
    float32, key length of that forward); queries without the attribute (CPU, a masked later prefill, chunked
    prefill) carry none."""
    warmup_lengths: ClassVar[tuple[int, ...]] = ()
    """Dummy prompt lengths the engine's warm-up feeds besides its own short ones: lengths where the method's
    kernels take another path to compile before the first timed turn (e.g. Tri-shape's split-key dense rows)."""
    fast_decode: ClassVar[bool] = True
    """The cache does not change between decode steps except by appending, so the engine may decode through a
    pre-allocated cache and a captured step (scbench/engines/fastdecode.py); False: the plain loop."""
    dense_prefill: ClassVar[bool] = True
    """The first prefill is the plain dense forward of the unchanged prompt (full attention, and methods acting only
    after it: eviction, quantisation, loading), so a sweep may compute it once and fork the cache for every such
    method (scbench/group.py). False for sparse prefill, prompt compression and chunk KV reuse."""
    sharded: ClassVar[str | None] = None
    """None: the method runs on a model split over devices (``model.device_map``); else why it cannot (the run is
    refused before the model loads)."""
    costs: ClassVar[dict[str, Cost]] = {}
    """The method's own cost columns (name -> ``Cost``), next to the universal ``TurnStats`` fields. It reports
    their values from ``take_costs``; they are stored in the turn's ``method_costs`` JSON column and read by the
    export, leaderboard, HTML page, figures and docs/results_schema.md (see CONTRIBUTING.md)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        universal = {f.name for f in dataclasses.fields(TurnStats)}
        for col, cost in cls.costs.items():
            if not isinstance(cost, Cost):
                raise TypeError(f"{cls.__name__}.costs[{col!r}] must be a scbench.records.Cost, got {type(cost).__name__}")
            if not col.isidentifier() or col in universal:
                raise ValueError(f"{cls.__name__}.costs: {col!r} must be an identifier and not a universal TurnStats "
                                 f"column ({', '.join(sorted(universal))})")

    # --- hooks (override what the method needs) -------------------------------------------------
    def compress_cache(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compression stage: return the kept keys and values of one layer.

        Args:
            keys, values: [batch, kv_heads, tokens, head_dim], the layer's whole cache (post-RoPE keys).
            queries: [batch, q_heads, window, head_dim], the last ``query_window`` prompt queries of this
                layer (post-RoPE), or None when ``query_window`` is 0.
        Returns:
            (keys, values) with the same batch, heads and head_dim and at most ``tokens`` tokens. The kept
            tensors must really be smaller: the engine counts resident bytes from them. A method that changes
            the representation (e.g. KIVI's packed integers) may instead return a transformers cache layer
            that replaces this one; such a layer implements ``scbench.kv.cache.CacheLayer`` (bytes, crop, snapshot).
        """
        raise NotImplementedError

    def scores_in_forward(self) -> bool:
        """True: the engine computes this method's compression scores during the prefill forward, layer by layer
        (``forward_scores``), instead of keeping the captured queries of every layer until the compression; the
        compression then gets, as a layer's ``queries``, an empty tensor carrying the scores (``scbench_scores``,
        [B, Hkv, n] float32). Only for scores that are sums over the queries (chunks add up). Default: False."""
        return False

    def forward_scores(self, layer_idx: int, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """With ``scores_in_forward``: the scores [B, Hkv, n] of the layer's keys [B, Hkv, n, D] (every key of the
        layer so far) from one forward's queries [B, Hq, w, D] (the last w positions; ``scbench_lse`` attached where
        the forward computed it)."""
        raise NotImplementedError

    def score_key(self) -> tuple | None:
        """What this method's compression scores depend on besides the cache, the fed tokens and the captured
        queries: the knobs that change the scores, not those that change only what is kept (a budget, a level).
        In a grouped sweep (scbench/group.py) the runs whose first compression follows one shared prefill and whose
        keys are equal compute the scores once (``shared_scores``; SnapKV, PyramidKV and AdaKV at one window and
        kernel, H2O at one observation window, KVzip at one chunk size: a budget sweep scores once). None (the
        default): never shared."""
        return None

    def shared_scores(self, part, compute):
        """``compute()``, or the value it returned for another run of the group (see ``score_key``; ``part`` names
        what is scored, e.g. the layer) -> (value, seconds): seconds is the measured time of the shared computation
        when this run reused it (its cost columns count it as the run's own), 0.0 when computed here. Outside a
        grouped sweep's first compression: ``(compute(), 0.0)``."""
        memo, key = getattr(self, "_score_memo", None), self.score_key()
        if memo is None or key is None:
            return compute(), 0.0
        return memo.get((key, part), compute)

    def begin_compression(self, *, num_layers: int, seen_tokens: int) -> None:
        """Called by the engine before ``compress_cache`` runs over the layers of one compression pass.

        ``seen_tokens`` counts every position fed so far (the context a ratio budget refers to, which can
        exceed the cache length after earlier evictions). Default: nothing.
        """

    def prepare_compression(self, session, ids: list[int]) -> None:
        """Called by the engine after ``begin_compression`` and before ``compress_cache`` runs over the layers.

        ``session`` is the engine session (its cache holds ``ids``, the tokens fed since the previous firing, at
        the end of every layer); a method may run extra forwards through it and must leave its cache and position
        as it found them (KVzip's context reconstruction). Its time counts as compression time. Default: nothing.
        """

    def compress_ragged(self, layer_idx: int, layer, queries: torch.Tensor | None):
        """Compression of a layer whose KV heads hold different lengths (``scbench.kv.ragged.RaggedLayer``).

        Default: ``compress_cache`` on each KV head alone with the query heads of its group. Returns a new layer.
        """
        from scbench.kv.ragged import compress_heads

        return compress_heads(self, layer_idx, layer, queries)

    def prefill_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Generation stage (sparse prefill): causal attention output for a prefill chunk.

        Args:
            q: [batch, q_heads, q_len, head_dim]; k, v: [batch, kv_heads, kv_len, head_dim], kv_len >= q_len,
                the queries being the last q_len positions of the keys (bottom-right causal alignment).
        Returns:
            [batch, q_heads, q_len, head_dim].
        """
        raise NotImplementedError

    def compress_context(self, context: str, *, engine) -> str:
        """Generation stage (prompt compression): the shared context as the model will see it.

        Called once per example, before any prompt is built, on the context text alone (never on a query);
        every turn's prompt then carries the returned text. ``engine`` gives the run's tokenizer and model.
        """
        raise NotImplementedError

    def blend_prefill(self, session, ids: list[int]):
        """Retrieval stage (chunk KV reuse): build the first prefill's cache from stored chunk KV.

        Called by the engine instead of a plain forward when the session's cache is empty and the prefill
        policy applies (as sparse prefill). Fills ``session``'s cache with ``len(ids)`` positions and
        returns the engine's ``FeedStats``.
        """
        raise NotImplementedError

    def decode_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, layer=None
    ) -> torch.Tensor:
        """Retrieval / loading stage: attention output of one decode step; the method picks the keys to load.

        Args:
            q: [batch, q_heads, 1, head_dim], the new token's queries (post-RoPE).
            k, v: [batch, kv_heads, kv_len, head_dim], the layer's keys and values (new token included) where
                its cache stores them (for a ``scbench.kv.offload.TieredLayer``: its tier, possibly host memory).
            layer: the session's cache layer holding them (a ``TieredLayer`` loads rows and counts the bytes).
        Returns:
            [batch, q_heads, 1, head_dim] on q's device. Methods with this hook set ``fast_decode = False``.
        """
        raise NotImplementedError

    def promises(self, *, context_tokens: int, kv_heads: int, head_dim: int, elt: int, num_layers: int,
                 q_heads: int) -> dict[str, tuple[str, float]]:
        """What one firing of the method promises for a context of ``context_tokens`` tokens (the cache holds
        ``num_layers`` layers of ``kv_heads`` heads of ``head_dim`` elements of ``elt`` bytes; ``q_heads`` query
        heads), by measured quantity: ``{"kept_tokens":
        ("eq", 4096)}``, ``{"attn_density": ("lt", 1.0)}``... (see scbench/checks.py). The runner compares them with
        what the engine measured and flags the turn ``unfired`` when they disagree. Default: no promise."""
        return {}

    def take_costs(self, session) -> dict[str, float | int | None]:
        """This turn's values of the method's ``costs``, and reset what the method counts for them.

        The one path by which a method reports its own costs: the runner calls it once per generated turn, after
        generation (``session``: the example's engine session, e.g. an ``HFSession`` with its ``cache``). Return only
        declared names; a declared name left out takes its ``Cost.default``. Default: nothing measured."""
        return {}

    def engine_args(self) -> dict:
        """Engine construction arguments the method needs (e.g. ``{"kv_cache_dtype": "fp8"}`` on vLLM); they join
        the engine options, so another value loads another engine. Default: none."""
        return {}

    def setup(self, engine) -> None:
        """Prepare what the method needs from the run's engine (e.g. a scorer model on its device) before an
        example is replayed. The runner calls it at the start of every example with the same engine: keep what it
        loads. Default: nothing."""

    # --- declarations derived from the hooks ----------------------------------------------------
    @classmethod
    def hooks(cls) -> frozenset[str]:
        """Names of the hooks this class overrides."""
        return frozenset(
            h for h in ("compress_cache", "prefill_attention", "compress_context", "blend_prefill", "decode_attention")
            if getattr(cls, h) is not getattr(Method, h)
        )

    @classmethod
    def budget_label(cls, knobs: dict) -> str:
        """The run's KV budget in short form for reports (the export's ``budget``): ``full`` without knobs, the
        ``budget`` knob (``256``; a ratio of the context as ``1/32``), else every knob as ``k=v``.

        ``knobs``: the run's stored method knobs (its spec's ``method`` without ``name``). A classmethod, so reports
        need not build the method (whose packages may be missing where the report runs). Override it where
        another knob sets the budget (KIVI: ``2bit``, StreamingLLM: ``128+3968``)."""
        if "budget" in knobs:
            b = knobs["budget"]
            if isinstance(b, float) and 0 < b < 1:
                return f"1/{round(1 / b)}" if abs(1 / b - round(1 / b)) < 1e-6 else f"{b:g}"
            return str(b)
        return "full" if not knobs else ",".join(f"{k}={v}" for k, v in sorted(knobs.items()))

    @classmethod
    def cost_columns(cls) -> dict[str, Cost]:
        """Every method-specific cost column of this method's turns: those the runner measures around the hooks it
        overrides (``HOOK_COSTS``), then its own ``costs``."""
        out: dict[str, Cost] = {}
        for hook in sorted(cls.hooks()):
            out.update(HOOK_COSTS.get(hook, {}))
        out.update(cls.costs)
        return out

    def describe(self) -> dict:
        """What ran: name, knobs, stages, hooks and any approximation note (stored with every run)."""
        return {
            "name": self.name,
            "params": dataclasses.asdict(self),
            "stages": list(self.stages),
            "hooks": sorted(self.hooks()),
            "approximation": self.approximation,
        }

    def label(self) -> str:
        """Short human label for leaderboards, e.g. ``streamingllm(n_init=128,n_local=3968)``."""
        params = dataclasses.asdict(self)
        inner = ",".join(f"{k}={v}" for k, v in params.items())
        return f"{self.name}({inner})" if inner else self.name


def positive_int(obj: object, field: str, minimum: int = 1) -> None:
    """Raise ValueError naming the field when ``obj.field`` is not an int >= minimum."""
    value = getattr(obj, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(obj).__name__}.{field} must be an integer >= {minimum}, got {value!r}")
