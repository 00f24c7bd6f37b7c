"""`make bench-methods`: every method's cost columns through the real CLI (`scbench run`: runner, store, export).

    python scripts/bench_methods.py                 # CUDA: random Llama-3.1-8B-shaped bf16 model, 32K and 128K
    python scripts/bench_methods.py --cpu           # no CUDA (also the default there): tiny model, quick
    python scripts/bench_methods.py --lengths 32000 --modes multi_turn --methods full quest --out results/perf/x

One `scbench run -m method=...` process per (context length, mode), so the model is built once (in memory,
``model.path=random:llama-3.1-8b``) and every method's run lands in one store; each run warms up on dummy prompts
first (``warmup_s``, kept out of prefill and decode times). Per method the table gives: first-turn prefill seconds
(compression included), later-turn prefill, warm-up seconds (run warm-up + graph captures, all turns), decode
tokens/s (median over turns) and its ratio to full attention in the same (length, mode), the decode path, KV bytes
resident after the first turn, bytes read per decoded token (``loaded_bytes`` for loading methods, else the resident
KV, which a dense decode step reads whole), and peak accelerator memory. Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GPU_METHODS = ["full", "streamingllm", "snapkv", "pyramidkv", "h2o", "quest", "kivi", "retrieval_attention-device",
               "ashape", "trishape", "vertical_slash"]
SLOW_AT_128K = {"h2o"}
"""Left out at 128K unless named: the first prefill's score accumulation (issue 18) would dominate the call."""
CPU_METHODS = ["full", "streamingllm-1k", "snapkv-1k", "quest-1k", "kivi", "ashape-1k"]


def run_cli(args: list[str], env: dict) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    # -P: the installed scbench, not the source folder the command runs in (its methods/ maps to scbench.methods)
    p = subprocess.run([sys.executable, "-P", "-m", "scbench.cli", "run", "-m", *args], env=env, capture_output=True,
                       text=True)
    return p.returncode, time.perf_counter() - t0, (p.stdout + p.stderr)[-4000:]


def summarize(store_path: str, length: int, mode: str) -> list[dict]:
    from scbench.store import Store

    store = Store(store_path)
    try:
        rows = []
        for run in store.runs():
            spec = json.loads(run["spec"]) if isinstance(run.get("spec"), str) else run.get("spec") or {}
            turns = store.turns(run["run_id"])
            row = {"method": run["method_label"], "config": spec.get("method", {}), "length": length, "mode": mode,
                   "status": run.get("status"), "turns": len(turns)}
            if run.get("error"):
                row["error"] = str(run["error"]).splitlines()[0][:300]
            if turns:
                first, later = turns[0], turns[1:]
                rates = [t["decode_tok_s"] for t in turns if t["decode_tok_s"]]
                toks = sum(max(0, t["decode_tokens"] - 1) for t in turns)
                loaded = sum(t["loaded_bytes"] or 0 for t in turns)
                row.update(
                    prompt_tokens=first["prompt_tokens"], prefill_s=first["prefill_s"], compress_s=first["compress_s"],
                    later_prefill_s=statistics.median([t["prefill_s"] for t in later]) if later else None,
                    warmup_s=sum(t.get("warmup_s") or 0.0 for t in turns),
                    decode_tok_s=statistics.median(rates) if rates else 0.0, decode_tok_s_all=rates,
                    decode_path=",".join(sorted({t["decode_path"] for t in turns})),
                    kv_bytes=first["kv_bytes"], kv_full_bytes=first["kv_full_bytes"],
                    bytes_per_token=loaded / toks if loaded and toks else first["kv_bytes"],
                    bytes_per_token_source="loaded_bytes" if loaded else "kv_bytes (dense read)",
                    peak_mem_bytes=max(t["peak_mem_bytes"] for t in turns), attn_density=first["attn_density"],
                    prefill_fallbacks=first.get("prefill_fallbacks"))
            rows.append(row)
    finally:
        store.close()
    full = next((r for r in rows if r["config"].get("name") == "full" and r.get("decode_tok_s")), None)
    for r in rows:
        if full and r.get("decode_tok_s"):
            r["decode_vs_full"] = r["decode_tok_s"] / full["decode_tok_s"]
            r["prefill_vs_full"] = r["prefill_s"] / full["prefill_s"]
    return rows


KEY_KNOBS = ("budget", "bits", "top_k", "tier", "n_local", "vertical_size")


def short(row: dict) -> str:
    """A table label: the method name and its budget-like knobs (the JSON keeps the full label)."""
    cfg = row.get("config") or {}
    knobs = [f"{k}={cfg[k]}" for k in KEY_KNOBS if k in cfg]
    return f"{cfg.get('name', row['method'])}" + (f" ({', '.join(knobs)})" if knobs else "")


def table(rows: list[dict]) -> str:
    gib = 2**30
    head = ("| context | mode | method | prefill s | later prefill s | warm-up s | decode tok/s | vs full | path | "
            "KV GiB | read/token GiB | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    out = []
    for r in rows:
        if "prefill_s" not in r:
            out.append(f"| {r['length']} | {r['mode']} | {short(r)} | failed: {r.get('error', r['status'])} "
                       "| | | | | | | | |")
            continue
        lp = f"{r['later_prefill_s']:.3f}" if r["later_prefill_s"] is not None else "-"
        out.append(f"| {r['length']} | {r['mode']} | {short(r)} | {r['prefill_s']:.2f} | {lp} | {r['warmup_s']:.1f} | "
                   f"{r['decode_tok_s']:.1f} | {r.get('decode_vs_full', 0):.2f} | {r['decode_path']} | "
                   f"{r['kv_bytes'] / gib:.2f} | {r['bytes_per_token'] / gib:.3f} | {r['peak_mem_bytes'] / gib:.1f} |")
    return head + "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="quick CPU version (the default without CUDA)")
    ap.add_argument("--lengths", type=int, nargs="+")
    ap.add_argument("--modes", nargs="+", default=["multi_turn"])
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=100)
    ap.add_argument("--model", default="random-llama-3.1-8b",
                    help="model config on CUDA (random-llama-3.1-70b: split over the visible GPUs)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for the random model (model.tokenizer)")
    ap.add_argument("--commit", default=os.environ.get("SCBENCH_COMMIT"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    ap.add_argument("--combine", nargs="+", help="merge the JSON files of earlier calls into --out (no runs)")
    a = ap.parse_args()
    if a.combine:
        return combine(a.combine, Path(a.out))
    import torch

    cpu = a.cpu or not torch.cuda.is_available()
    lengths = a.lengths or ([2000] if cpu else [32000, 128000])
    methods = a.methods or (CPU_METHODS if cpu else GPU_METHODS)
    model = ["model=smollm2-135m", "model.device=cpu"] if cpu else [f"model={a.model}"]
    if a.tokenizer:
        model.append(f"model.tokenizer={a.tokenizer}")
    out = Path(a.out or ROOT / "results" / "perf" / ("methods_cpu" if cpu else "methods_gpu"))
    commit = a.commit or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip() or "unknown"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rows, logs = [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    for length in lengths:
        for mode in a.modes:
            use = [m for m in methods if not (length > 64000 and m in SLOW_AT_128K and not a.methods)]
            store = tmp / f"{length}-{mode}.sqlite"
            rc, secs, log = run_cli([*model, f"method={','.join(use)}", "task=scbench_kv", f"mode={mode}",
                                     f"data.length={length}", "data.n=1", f"data.turns={a.turns}",
                                     f"max_turns={a.turns}", f"max_new_tokens={a.max_new}", f"store={store}",
                                     "progress=false", f"hydra.sweep.dir={tmp}/hydra-{length}-{mode}", *a.extra], env)
            logs.append({"length": length, "mode": mode, "rc": rc, "seconds": secs, "log_tail": log})
            print(f"{length} {mode}: rc {rc}, {secs:.0f} s", flush=True)
            if store.exists():
                rows += summarize(str(store), length, mode)
    info = {"device": torch.cuda.get_device_name() if not cpu else "cpu", "torch": torch.__version__,
            "commit": commit, "model": model, "task": "scbench_kv", "turns": a.turns, "max_new_tokens": a.max_new,
            "note": "decode tok/s: median over the turns of each run; warm-up kept out of prefill and decode times"}
    out.parent.mkdir(parents=True, exist_ok=True)
    write(out, {**info, "rows": rows, "runs": logs})


def write(out: Path, data: dict) -> None:
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    md = (f"# Methods on {data['device']} (torch {data['torch']}, commit {data['commit']})\n\n"
          f"`scripts/bench_methods.py`: `scbench run` on {' '.join(data['model'])}, scbench_kv, generated data, "
          f"{data['turns']} turns of at most {data['max_new_tokens']} new tokens; decode tok/s is the median over turns; "
          "vs full: decode rate over full attention's in the same (context, mode).\n\n" + table(data["rows"]))
    out.with_suffix(".md").write_text(md)
    print(md)


def combine(files: list[str], out: Path) -> None:
    parts = [json.loads(Path(f).read_text()) for f in files]
    data = {**parts[0], "rows": [r for p in parts for r in p["rows"]], "runs": [r for p in parts for r in p["runs"]],
            "commit": ",".join(dict.fromkeys(p["commit"] for p in parts))}
    write(out, data)


if __name__ == "__main__":
    main()
