"""Write the all-methods reference table of the probe model from the store of ``scbench run -m sweep=reference``.

    scbench run -m sweep=reference                         # 84 runs into results/reference_sweep/scbench.sqlite
    python scripts/probe/reference_table.py                # -> results/reference/all_methods_probe.{md,json}

The JSON is compact (one entry per run: run id, task, mode, method, per-turn scores, the cost columns averaged over
turns, every prediction) and is what ``scripts/probe/ci_slice.py`` and the CI test compare against; the markdown is
``scbench export --format md`` of the same store under a header that states how it was made.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

COST_KEYS = ("kv_ratio", "attn_density", "context_rate", "recompute_frac", "loaded_bytes", "slow_tier_bytes",
             "ttft_s", "decode_tok_s")


def build(store) -> dict:
    from ci_slice import per_run

    from scbench.report.export import records

    recs = records(store)
    runs = {}
    for r in recs:
        run = runs.setdefault(r["run_id"], {
            "run_id": r["run_id"], "task": r["task"], "mode": r["mode"], "method": r["method"],
            "method_label": r["method_label"], "status": r["status"], "costs": {}, "_n": 0})
        run["_n"] += 1
        for k in COST_KEYS:
            v = r["costs"].get(k)
            if v is not None:
                run["costs"][k] = run["costs"].get(k, 0.0) + v
    for run_id, run in runs.items():
        n = run.pop("_n")
        run["costs"] = {k: round(v / n, 4) for k, v in run["costs"].items()}
        run.update(per_run(store, run_id))
    engine = (recs[0]["provenance"].get("engine") or {}) if recs else {}
    spec = (recs[0]["provenance"].get("spec") or {}) if recs else {}
    failed = [{"run_id": r["run_id"], "method": r["method"], "task": r["task"], "mode": r["mode"],
               "error": (r["error"] or "").splitlines()[:1]} for r in store.runs() if r["status"] != "done"]
    return {"preset": "sweep=reference", "model": engine.get("model"), "adapter_sha256": engine.get("adapter_sha256"),
            "device": engine.get("device_name"), "dtype": engine.get("dtype"),
            "data": spec.get("data"), "max_new_tokens": spec.get("max_new_tokens"),
            "packages": (recs[0]["provenance"].get("packages") if recs else None),
            "not_done": failed, "runs": sorted(runs.values(), key=lambda r: (r["task"], r["mode"], r["method_label"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(ROOT / "results" / "reference_sweep" / "scbench.sqlite"))
    ap.add_argument("--out", default=str(ROOT / "results" / "reference" / "all_methods_probe"),
                    help="path without suffix: writes .json and .md")
    ap.add_argument("--header", default="", help="text (markdown) put above the table")
    args = ap.parse_args()

    from scbench.report.table import category_averages, leaderboard, to_markdown
    from scbench.store import Store

    if not Path(args.store).exists():
        raise SystemExit(f"no results store at {args.store}: run `scbench run -m sweep=reference` first")
    store = Store(args.store)
    try:
        table = build(store)
        board = leaderboard(store)
    finally:
        store.close()
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    md = (args.header.rstrip() + "\n\n" if args.header else "") + to_markdown(board) + "\n\nCategory averages\n\n" \
        + to_markdown(category_averages(board)) + "\n"
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out.with_suffix('.json')} ({len(table['runs'])} runs, {len(table['not_done'])} not done) "
          f"and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
