"""Did the method fire? Per-turn checks of a method's promise against what the engine measured, and capped turns.

A method declares, through ``Method.promises``, what one compression / sparse prefill / context compression of a
given context promises, keyed by a measured quantity:

- ``kept_tokens``: mean tokens per layer right after compression (eviction methods: their budget);
- ``kv_ratio``: resident KV bytes right after compression / a full cache of the same tokens (quantization);
- ``attn_density``: share of the causal score matrix the prefill computed (sparse prefill);
- ``context_rate``: compressed / original context tokens (prompt compression);
- ``loaded_ratio``: KV bytes loaded by the first turn's decode steps / what dense decoding would have loaded
  (loading methods: Quest, RetrievalAttention);
- ``attended_ratio``: KV rows attended per decode step and query head / rows stored, first turn (a loading method
  that attends where the KV lives and moves only partial results: RetrievalAttention's host split);
- ``recompute_frac``: share of the first prefill's tokens recomputed (chunk KV reuse).

Each promise is ``(op, value)``: ``"eq"`` holds when ``|measured - value| <= max(abs_tol, rel_tol * value)``,
``"lt"`` when ``measured < value``. A promise whose quantity was not measured in a turn where the method should
have acted (compression never applied) fails too. A failed promise flags the turn ``unfired``; the check list is
stored with the turn (``TurnStats.checks``, JSON) and ``strict=true`` turns the flag into a run failure.

A turn is flagged ``capped`` when its generation stopped at the token cap while every reference answer needs
more tokens than the cap: its score says nothing about the method.
"""
from __future__ import annotations

import json

REL_TOL = 0.02
ABS_TOL = 1.0
"""Tolerance of ``eq`` promises: 2 % of the promised value, at least 1 (a token; PyramidKV rounds per layer)."""
QUANTITIES = ("kept_tokens", "kv_ratio", "attn_density", "context_rate", "loaded_ratio", "attended_ratio",
              "recompute_frac")
UNFIRED, CAPPED = "unfired", "capped"


def evaluate(promised: dict[str, tuple[str, float]], measured: dict[str, float | None]) -> list[dict]:
    """One entry per promise: {quantity, op, promised, measured, ok}."""
    out = []
    for q, (op, value) in promised.items():
        if q not in QUANTITIES:
            raise ValueError(f"unknown promised quantity {q!r}; expected one of {QUANTITIES}")
        if op not in ("eq", "lt"):
            raise ValueError(f"promise {q!r}: op must be 'eq' or 'lt', got {op!r}")
        m = measured.get(q)
        if m is None:
            ok = False
        elif op == "eq":
            ok = abs(m - value) <= max(ABS_TOL if q == "kept_tokens" else 0.0, REL_TOL * abs(value))
        else:
            ok = m < value
        out.append({"quantity": q, "op": op, "promised": value, "measured": m, "ok": ok})
    return out


def flags_of(checks: list[dict], capped: bool) -> str:
    flags = ([UNFIRED] if any(not c["ok"] for c in checks) else []) + ([CAPPED] if capped else [])
    return ",".join(flags)


def dumps(checks: list[dict]) -> str:
    return json.dumps(checks) if checks else ""


def needs_more_tokens(answer, cap: int, encode) -> bool:
    """True when every acceptable reference answer is longer than ``cap`` tokens (``encode``: text -> ids)."""
    answers = answer if isinstance(answer, (list, tuple)) else [answer]
    answers = [a for a in answers if a is not None and str(a) != ""]
    if not answers:
        return False
    return min(len(encode(str(a))) for a in answers) > cap


def dense_load_bytes(kv_full_bytes: int, positions: int, steps: int) -> float:
    """Bytes ``steps`` decode steps would load attending densely, the last step at ``positions`` positions and
    ``kv_full_bytes`` the full cache there: step s (1..steps) attends to ``positions - steps + s`` rows."""
    if steps < 1 or positions < 1:
        return 0.0
    per_row = kv_full_bytes / positions
    return per_row * (steps * (positions - steps) + steps * (steps + 1) / 2)


def has_flag(flags: str | None, flag: str) -> bool:
    return flag in (flags or "").split(",")
