"""Versioned JSON export: one record per model x method x budget x mode x task x turn (schema in docs/results_schema.md)."""
from __future__ import annotations

import json
import math

import pandas as pd

from scbench.methods.base import Method
from scbench.registry import METHODS
from scbench.report import costs as method_costs
from scbench.report import payback
from scbench.report import trust
from scbench.report.table import _category

EXPORT_SCHEMA = "scbench.results"
EXPORT_SCHEMA_VERSION = "1.0"

COSTS = {  # record field -> (store column, aggregation over the examples of one turn): the universal columns
    "prompt_tokens": ("prompt_tokens", "mean"),
    "prefill_computed": ("prefill_computed", "mean"),
    "prefill_reused": ("prefill_reused", "mean"),
    "ttft_s": ("ttft_s", "mean"),
    "decode_tok_s": ("decode_tok_s", "mean"),
    "kv_bytes": ("kv_bytes", "mean"),
    "kv_full_bytes": ("kv_full_bytes", "mean"),
    "state_bytes": ("state_bytes", "mean"),
    "slow_tier_bytes": ("slow_tier_bytes", "mean"),
    "loaded_bytes": ("loaded_bytes", "mean"),
    "load_s": ("load_s", "mean"),
    "attn_recall": ("attn_recall", "mean"),
    "peak_mem_bytes": ("peak_mem_bytes", "max"),
    "attn_density": ("attn_density", "mean"),
    "prefill_shared": ("prefill_shared", "max"),
    "scores_shared": ("scores_shared", "max"),
    "decode_batch": ("decode_batch", "max"),
    "decode_runs": ("decode_runs", "max"),
}
"""Method-specific columns follow, from the methods' declarations (scbench.report.costs.declared_costs): every
record carries every declared column, at its default where the run's method does not measure it."""


def method_budget(method: dict) -> str:
    """A run's KV budget as a short label (``full``, ``256``, ``1/32``, ``2bit``, ``top4096``, ``32+224``): its
    method's ``budget_label`` (the base rule for a method no longer registered)."""
    knobs = {k: v for k, v in method.items() if k != "name"}
    try:
        cls = METHODS.get(method.get("name"))
    except KeyError:
        cls = Method
    return cls.budget_label(knobs)


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def records(store, variant: str | None = None, include_incomplete: bool = False) -> list[dict]:
    """The export records (see docs/results_schema.md), sorted by model, method, budget, mode, task, turn.

    ``variant``: where turns were re-scored under that task variant (``scbench score --variant``), their records
    carry those scores and name the variant in ``task_variant``; other turns keep their own scores.
    Runs that are not complete (``status`` other than done, or turns missing) are left out unless
    ``include_incomplete``; every record says its run's status and turns done / expected."""
    runs = {r["run_id"]: r for r in store.runs()}
    setting = trust.settings(list(runs.values()))
    rows = []
    for t in store.turns(variant=variant):
        if not (include_incomplete or runs[t["run_id"]]["complete"]):
            continue
        row = {"run_id": t["run_id"], "example": t["example_id"], "turn": t["turn"] + 1, "scores": t["scores"],
               "rescored": t["scores_variant"] or "", "flags": t.get("flags") or ""}
        row.update({f: t[col] for f, (col, _) in COSTS.items()})
        row["kv_ratio"] = t["kv_bytes"] / t["kv_full_bytes"] if t["kv_full_bytes"] else None  # per turn, then mean
        row.update(method_costs.values(t["method_costs"]))
        rows.append(row)
    if not rows:
        return []
    df = pd.DataFrame(rows)
    paid = payback.paybacks(store, include_incomplete)
    out = []
    for (run_id, rescored, turn), g in df.groupby(["run_id", "rescored", "turn"], sort=False):
        run = runs[run_id]
        spec = json.loads(run["spec"])
        prov = json.loads(run["provenance"] or "{}")
        metrics = sorted({m for s in g["scores"] for m in s})
        scores = {m: _clean(100.0 * sum(float(s[m]) for s in g["scores"] if m in s) / sum(m in s for s in g["scores"]))
                  for m in metrics}
        aggs = {**{f: how for f, (_, how) in COSTS.items()},
                **{f: c.agg for f, c in method_costs.declared_costs().items()}}
        costs = {f: _clean(getattr(g[f], how)()) for f, how in aggs.items()}
        costs["kv_ratio"] = _clean(g["kv_ratio"].dropna().mean()) if g["kv_ratio"].notna().any() else None
        method = prov.get("method") or {}
        per_example = [sum(float(v) for v in s.values()) / len(s) * 100.0 for s in g["scores"] if s]
        flags = [{"flags": f} for f in g["flags"]]
        out.append({
            "schema": EXPORT_SCHEMA, "schema_version": EXPORT_SCHEMA_VERSION,
            "model": run["model"], "method": run["method"], "method_label": run["method_label"],
            "budget": method_budget(spec.get("method") or {}), "mode": run["mode"], "task": run["task"],
            "task_variant": rescored or spec.get("task_variant") or "faithful",
            "category": (prov.get("task") or {}).get("category") or _category(run["task"]),
            "stages": list(method.get("stages") or []), "turn": int(turn), "n_examples": int(g["example"].nunique()),
            "setting": setting[run_id],
            "scores": scores, "score": _clean(sum(scores.values()) / len(scores)) if scores else None,
            "scores_ci95": {m: list(trust.bootstrap_ci([100.0 * float(s[m]) for s in g["scores"] if m in s]))
                            for m in metrics},
            "score_ci95": list(trust.bootstrap_ci(per_example)),
            "capped_share": trust.flag_share(flags, "capped"), "unfired_share": trust.flag_share(flags, "unfired"),
            "costs": costs, "payback": _payback(paid.get(run_id)), "run_id": run_id, "status": run["status"], "complete": run["complete"],
            "turns_done": run["turns_done"], "turns_expected": run["turns_expected"],
            "provenance": {"git": prov.get("git"), "packages": prov.get("packages"), "engine": prov.get("engine"),
                           "method": method, "task": prov.get("task"), "spec": spec},
        })
    out.sort(key=lambda r: (r["model"], r["method"], r["budget"], r["setting"], r["mode"], r["task"], r["turn"]))
    return out


def _payback(p: dict | None) -> dict | None:
    """The run's payback numbers for JSON: ``queries_to_pay_back`` null and ``pays_back`` false when it never does."""
    if p is None:
        return None
    q = p["queries_to_pay_back"]
    return {**{k: _clean(v) for k, v in p.items()}, "queries_to_pay_back": None if math.isinf(q) else int(q),
            "pays_back": not math.isinf(q)}


def failures(store) -> list[dict]:
    return [{"run_id": r["run_id"], "model": r["model"], "method": r["method"], "task": r["task"], "mode": r["mode"],
             "error": (r["error"] or "").splitlines()[0] if r["error"] else None}
            for r in store.runs() if r["status"] == "failed"]


def to_json(store, variant: str | None = None, include_incomplete: bool = False) -> str:
    """A JSON array of records; every record names its schema and version (so records can be streamed,
    concatenated across stores and ingested one by one). ``variant``, ``include_incomplete``: as in ``records``."""
    return json.dumps(records(store, variant, include_incomplete), indent=1, default=str)
