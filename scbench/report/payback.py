"""Queries to pay back a one-time compression: the extra first-prefill time of a compressing run vs full attention,
the time each later query saves, and how many queries it takes for the savings to cover the extra time.

KVzip's scoring prefill (and any method's compression that fires in the first turn: ``compress_s`` > 0 there) makes
the first prefill slower once; every later query (turn) is cheaper when the smaller cache makes its prefill and
decode faster. For each such run, the full-attention run of the same store with the same model, task and mode is
its baseline (the one sharing the most examples; only the examples both ran are compared, ``n_examples``):

- ``extra_once_s``: mean over those examples of the first turn's ``prefill_s`` (compression included) minus full
  attention's;
- ``saving_per_query_s``: mean over the later turns (2, 3, ...) of full attention's query time minus the run's,
  a query's time being its ``prefill_s`` plus its decode at the baseline's answer length (``decode_s`` per decoded
  token after the first, times full attention's mean decode tokens of that turn), so a method that answers shorter
  is not credited for it. The first turn's own decode saving is not counted (conservative);
- ``queries_to_pay_back``: ceil(extra / saving); 0 when the first prefill is not slower; ``inf`` (None in JSON) when
  no later query is cheaper (it never pays back) or the task has a single turn.
Times are wall-clock as recorded; runs measured on different machines or under load are not comparable.
"""
from __future__ import annotations

import math
from collections import defaultdict

FIELDS = ("extra_once_s", "saving_per_query_s", "queries_to_pay_back")
LABELS = {"extra_once_s": "extra once s", "saving_per_query_s": "saving/query s",
          "queries_to_pay_back": "queries to pay back"}
"""Leaderboard headers of the three numbers (one value per run, not per turn)."""


def _by_turn(rows: list[dict]) -> dict[int, dict[str, dict]]:
    out: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        out[r["turn"]][r["example_id"]] = r
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _s_per_token(r: dict) -> float | None:
    steps = (r.get("decode_tokens") or 0) - 1
    return r["decode_s"] / steps if steps > 0 else None


def query_time(r: dict, tokens: float) -> float:
    """One turn's prefill plus its decode at ``tokens`` decoded tokens (its own decode rate)."""
    per = _s_per_token(r)
    return r["prefill_s"] + (per * max(tokens - 1, 0) if per is not None else r["decode_s"])


def payback(run_rows: list[dict], full_rows: list[dict]) -> dict | None:
    """The three numbers for one compressing run vs its full-attention baseline (turn rows of the store), or None
    when they share no example."""
    ours, full = _by_turn(run_rows), _by_turn(full_rows)
    common = sorted(set(ours.get(0, {})) & set(full.get(0, {})))
    if not common:
        return None
    extra = _mean([ours[0][e]["prefill_s"] - full[0][e]["prefill_s"] for e in common])
    savings = []
    for t in sorted(set(ours) & set(full)):
        if t == 0:
            continue
        ex = [e for e in common if e in ours[t] and e in full[t]]
        if not ex:
            continue
        tokens = _mean([full[t][e].get("decode_tokens") or 0 for e in ex])
        savings.append(_mean([query_time(full[t][e], tokens) - query_time(ours[t][e], tokens) for e in ex]))
    saving = _mean(savings) if savings else None
    if extra <= 0:
        queries = 0.0
    elif saving is None or saving <= 0:
        queries = math.inf
    else:
        queries = float(math.ceil(extra / saving))
    return {"extra_once_s": extra, "saving_per_query_s": saving, "queries_to_pay_back": queries,
            "n_examples": len(common)}


def compresses_once(rows: list[dict]) -> bool:
    """A run whose first turn recorded compression time (the one-time cost)."""
    return any(r["turn"] == 0 and (r.get("compress_s") or 0) > 0 for r in rows)


def paybacks(store, include_incomplete: bool = False) -> dict[str, dict]:
    """run_id -> payback numbers (+ ``baseline_run_id``) for every compressing run with a full-attention baseline in
    the same store (same model, task, mode)."""
    runs = {r["run_id"]: r for r in store.runs() if include_incomplete or r["complete"]}
    turns: dict[str, list[dict]] = defaultdict(list)
    for t in store.turns():
        if t["run_id"] in runs:
            turns[t["run_id"]].append(t)
    full = defaultdict(list)
    for rid, r in runs.items():
        if r["method"] == "full":
            full[(r["model"], r["task"], r["mode"])].append(rid)
    out = {}
    for rid, r in runs.items():
        base = full.get((r["model"], r["task"], r["mode"]))
        if r["method"] == "full" or not base or not compresses_once(turns[rid]):
            continue
        mine = {t["example_id"] for t in turns[rid]}
        best = max(base, key=lambda b: (len(mine & {t["example_id"] for t in turns[b]}), b))
        res = payback(turns[rid], turns[best])
        if res is not None:
            out[rid] = {**res, "baseline_run_id": best}
    return out
