"""Versioned JSON export: one record per model x method x budget x mode x task x turn (schema in docs/results_schema.md)."""
from __future__ import annotations

import json
import math

import pandas as pd

from scbench.report.table import _category

EXPORT_SCHEMA = "scbench.results"
EXPORT_SCHEMA_VERSION = "1.0"

COSTS = {  # record field -> (store column, aggregation over the examples of one turn)
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
    "index_recall": ("index_recall", "mean"),
    "index_build_s": ("index_build_s", "mean"),
    "index_bytes": ("index_bytes", "mean"),
    "peak_mem_bytes": ("peak_mem_bytes", "max"),
    "attn_density": ("attn_density", "mean"),
    "context_rate": ("context_rate", "mean"),
    "context_compress_s": ("context_compress_s", "mean"),
    "recompute_frac": ("recompute_frac", "mean"),
    "chunk_kv_s": ("chunk_kv_s", "mean"),
    "prefill_saved_s": ("prefill_saved_s", "mean"),
}


def method_budget(method: dict) -> str:
    """A method's KV budget as a short label: ``full``, ``256``, ``1/32``, ``2bit``, ``top4096``, ``32+224``."""
    p = {k: v for k, v in method.items() if k != "name"}
    if "budget" in p:
        b = p["budget"]
        if isinstance(b, float) and 0 < b < 1:
            return f"1/{round(1 / b)}" if abs(1 / b - round(1 / b)) < 1e-6 else f"{b:g}"
        return str(b)
    if "bits" in p:
        return f"{p['bits']}bit"
    if "top_k" in p:
        return f"top{p['top_k']}"
    if "n_init" in p and "n_local" in p:
        return f"{p['n_init']}+{p['n_local']}"
    if "vertical_size" in p:
        return f"{p['vertical_size']}v+{p.get('slash_size')}s"
    return "full" if not p else ",".join(f"{k}={v}" for k, v in sorted(p.items()))


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def records(store, include_incomplete: bool = False) -> list[dict]:
    """The export records (see docs/results_schema.md), sorted by model, method, budget, mode, task, turn.
    Runs that are not complete (``status`` other than done, or turns missing) are left out unless
    ``include_incomplete``; every record says its run's status and turns done / expected."""
    runs = {r["run_id"]: r for r in store.runs()}
    rows = []
    for t in store.turns():
        run = runs[t["run_id"]]
        if not (include_incomplete or run["complete"]):
            continue
        row = {"run_id": t["run_id"], "example": t["example_id"], "turn": t["turn"] + 1, "scores": t["scores"]}
        row.update({f: t[col] for f, (col, _) in COSTS.items()})
        rows.append(row)
    if not rows:
        return []
    df = pd.DataFrame(rows)
    out = []
    for (run_id, turn), g in df.groupby(["run_id", "turn"], sort=False):
        run = runs[run_id]
        spec = json.loads(run["spec"])
        prov = json.loads(run["provenance"] or "{}")
        metrics = sorted({m for s in g["scores"] for m in s})
        scores = {m: _clean(100.0 * sum(float(s[m]) for s in g["scores"] if m in s) / sum(m in s for s in g["scores"]))
                  for m in metrics}
        costs = {f: _clean(getattr(g[f], how)()) for f, (_, how) in COSTS.items()}
        costs["kv_ratio"] = _clean(costs["kv_bytes"] / costs["kv_full_bytes"]) if costs["kv_full_bytes"] else None
        method = prov.get("method") or {}
        out.append({
            "schema": EXPORT_SCHEMA, "schema_version": EXPORT_SCHEMA_VERSION,
            "model": run["model"], "method": run["method"], "method_label": run["method_label"],
            "budget": method_budget(spec.get("method") or {}), "mode": run["mode"], "task": run["task"],
            "task_variant": spec.get("task_variant") or "faithful",
            "category": (prov.get("task") or {}).get("category") or _category(run["task"]),
            "stages": list(method.get("stages") or []), "turn": int(turn), "n_examples": int(g["example"].nunique()),
            "scores": scores, "score": _clean(sum(scores.values()) / len(scores)) if scores else None,
            "costs": costs, "run_id": run_id, "status": run["status"], "complete": run["complete"],
            "turns_done": run["turns_done"], "turns_expected": run["turns_expected"],
            "provenance": {"git": prov.get("git"), "packages": prov.get("packages"), "engine": prov.get("engine"),
                           "method": method, "task": prov.get("task"), "spec": spec},
        })
    out.sort(key=lambda r: (r["model"], r["method"], r["budget"], r["mode"], r["task"], r["turn"]))
    return out


def failures(store) -> list[dict]:
    return [{"run_id": r["run_id"], "model": r["model"], "method": r["method"], "task": r["task"], "mode": r["mode"],
             "error": (r["error"] or "").splitlines()[0] if r["error"] else None}
            for r in store.runs() if r["status"] == "failed"]


def to_json(store, include_incomplete: bool = False) -> str:
    """A JSON array of records; every record names its schema and version (so records can be streamed,
    concatenated across stores and ingested one by one)."""
    return json.dumps(records(store, include_incomplete), indent=1, default=str)
