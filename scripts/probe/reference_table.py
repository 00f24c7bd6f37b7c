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


def turn_table(runs: list[dict]) -> str:
    """Markdown: per method (label) and mode, the score of each turn averaged over the tasks, then the mean KV ratio
    (how the compressed cache serves later queries: query-aware vs query-agnostic, multi-turn vs multi-request)."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        cells.setdefault((r["method_label"], r["mode"]), []).append(r)
    modes = ("multi_turn", "multi_request")
    head = "| method | " + " | ".join(f"{m} T{t + 1}" for m in modes for t in range(3)) + " | KV vs full |"
    lines = [head, "|" + "---|" * (2 + 3 * len(modes))]
    for label in sorted({k[0] for k in cells}):
        row, ratios = [], []
        for m in modes:
            rs = cells.get((label, m), [])
            for t in range(3):
                vals = [r["per_turn"][t] for r in rs if len(r.get("per_turn") or []) > t]
                row.append(f"{sum(vals) / len(vals):.1f}" if vals else "")
            ratios += [r["costs"].get("kv_ratio") for r in rs if r["costs"].get("kv_ratio") is not None]
        ratio = f"{sum(ratios) / len(ratios):.3f}" if ratios else ""
        lines.append(f"| {label} | " + " | ".join(row) + f" | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(ROOT / "results" / "reference_sweep" / "scbench.sqlite"))
    ap.add_argument("--out", default=str(ROOT / "results" / "reference" / "all_methods_probe"),
                    help="path without suffix: writes .json and .md")
    ap.add_argument("--header", default="", help="text (markdown) put above the table")
    ap.add_argument("--extend", default=None, help="an earlier JSON of this script: keep its runs and add the store's "
                    "(same run id: the store's); the markdown then keeps the earlier markdown's tables below the "
                    "store's (only the cells of new methods need to run)")
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
    earlier_md = ""
    if args.extend:
        earlier = json.loads(Path(args.extend).read_text())
        new_ids = {r["run_id"] for r in table["runs"]}
        earlier_md = Path(args.extend).with_suffix(".md").read_text() if Path(args.extend).with_suffix(".md").exists() else ""
        table["runs"] = sorted([r for r in earlier["runs"] if r["run_id"] not in new_ids] + table["runs"],
                               key=lambda r: (r["task"], r["mode"], r["method_label"]))
        table["not_done"] = earlier.get("not_done", []) + table["not_done"]
    out.with_suffix(".json").write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    md = (args.header.rstrip() + "\n\n" if args.header else "") + turn_table(table["runs"]) + "\n\n" \
        + to_markdown(board) + "\n\nCategory averages\n\n" + to_markdown(category_averages(board)) + "\n"
    if earlier_md:
        md += "\n\n## Earlier rows (kept from the previous table)\n\n" + earlier_md
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out.with_suffix('.json')} ({len(table['runs'])} runs, {len(table['not_done'])} not done) "
          f"and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
