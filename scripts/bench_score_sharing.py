"""What sharing compression scores saves in a budget sweep: the same grouped sweeps (``share_prefill=true
timing=sequential``: one dense first prefill per example, forked per run) with every run scoring alone
(``SCBENCH_SHARE_SCORES=0``) and with the runs that score alike computing the scores once (the default;
``Method.score_key()``, scbench/engines/score_memo.py ``ScoreMemo``).

    python scripts/bench_score_sharing.py --out results/perf/score_sharing_cpu                       # CPU, SmolLM2
    python scripts/bench_score_sharing.py --model random-llama-3.1-8b --extra model.tokenizer=... \\
        --length 131000 --sweep kvzip:1024,2048,4096,8192 --out results/perf/score_sharing_h200          # GPU

Each ``--sweep NAME:B1,B2,...`` is one ``scbench run -m method=NAME method.budget=B1,B2,...`` process per way. Per
sweep and way: wall seconds of the process, the store's span (first run opened to last turn stored, less warm-ups:
what a sweep of many examples pays per example), the first turns' ``compress_s`` (each run's compression as it
costs alone: a reused score counts its measured seconds) and ``scores_shared``, and whether every prediction equals
the other way's. Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_methods import run_cli, summarize  # noqa: E402

WAYS = {"alone": "0", "shared": "1"}
"""Way -> SCBENCH_SHARE_SCORES."""


def collect(store_path: str) -> dict:
    """The store's span less warm-ups, per run its first turn's compress_s and scores_shared (bench_methods'
    per-run rows), and the predictions."""
    rows, preds, span = summarize(store_path, 0, "")
    warm = span["warmup_s"]
    return {"span_s": span["runs_s"] - warm if span["runs_s"] is not None else None, "runs": rows, "predictions": preds}


def table(data: dict) -> str:
    lines = [f"# Shared compression scores in a budget sweep ({data['model']}, {data['device']}, torch {data['torch']}, "
             f"commit {data['commit']})", "",
             f"`scripts/bench_score_sharing.py`: grouped sweeps (`share_prefill=true timing=sequential`) over "
             f"{data['task']} {data['mode']} (generated data, {data['length']} context tokens, {data['examples']} "
             f"example(s), {data['turns']} turns of at most {data['max_new_tokens']} new tokens), every run scoring "
             "alone (`SCBENCH_SHARE_SCORES=0`) against runs with equal `Method.score_key()` scoring once. span: first "
             "run opened to last turn stored, less warm-ups; compress s: the first turns' sum (a reused score counts "
             "its measured seconds, so both ways report what each run's compression costs alone).", "",
             "| sweep | way | wall s | span s | span saved | compress s (sum) | scores_shared | same predictions |",
             "|---|---|---|---|---|---|---|---|"]
    for sw in data["sweeps"]:
        alone = sw["ways"].get("alone", {})
        for way, r in sw["ways"].items():
            saved = (f"{1 - r['span_s'] / alone['span_s']:.0%}" if way != "alone" and r.get("span_s")
                     and alone.get("span_s") else "-")
            comp = sum(x.get("compress_s") or 0.0 for x in r.get("runs", []))
            shared = ",".join(str(x.get("scores_shared")) for x in r.get("runs", []))
            span = f"{r['span_s']:.1f}" if r.get("span_s") is not None else "-"
            lines.append(f"| {sw['sweep']} | {way} | {r['wall_s']:.1f} | {span} | {saved} | {comp:.2f} | {shared} | "
                         f"{sw.get('same', '-')} |")
    failed = [f"{sw['sweep']} {w}: rc {r['rc']}" for sw in data["sweeps"] for w, r in sw["ways"].items() if r["rc"]]
    if failed:
        lines += ["", "Failed: " + "; ".join(failed)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sweep", action="append", default=None,
                    help="NAME:B1,B2,... (a method config and the budgets swept); default kvzip-1k x 3, h2o-1k x 2")
    ap.add_argument("--task", default="scbench_kv")
    ap.add_argument("--mode", default="multi_request")
    ap.add_argument("--length", type=int, default=3000)
    ap.add_argument("--examples", type=int, default=1)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=8)
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    ap.add_argument("--commit", default=os.environ.get("SCBENCH_COMMIT"))
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import subprocess

    import torch

    sweeps = a.sweep or ["kvzip-1k:128,256,512", "h2o-1k:128,256"]
    cuda = torch.cuda.is_available()
    commit = a.commit or subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"],
                                        capture_output=True, text=True).stdout.strip() or "unknown"
    data = {"model": a.model, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "commit": commit, "task": a.task, "mode": a.mode, "length": a.length, "examples": a.examples,
            "turns": a.turns, "max_new_tokens": a.max_new, "extra": a.extra, "sweeps": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench-score-sharing-"))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for k, sweep in enumerate(sweeps):
        name, _, budgets = sweep.partition(":")
        entry = {"sweep": sweep, "ways": {}}
        for way, flag in WAYS.items():
            store = tmp / f"{k}-{way}.sqlite"
            env = dict(os.environ, PYTHONUNBUFFERED="1", SCBENCH_SHARE_SCORES=flag)
            rc, secs, log = run_cli([f"model={a.model}", *([] if cuda else ["model.device=cpu"]), f"method={name}",
                                     *([f"method.budget={budgets}"] if budgets else []), f"task={a.task}",
                                     f"mode={a.mode}", f"data.length={a.length}", f"data.n={a.examples}",
                                     f"data.turns={a.turns}", f"max_turns={a.turns}", f"max_new_tokens={a.max_new}",
                                     f"store={store}", "progress=false", "share_prefill=true", "timing=sequential",
                                     f"hydra.sweep.dir={tmp}/hydra-{k}-{way}", *a.extra], env, None)
            got = collect(str(store)) if store.exists() else {"span_s": None, "runs": [], "predictions": {}}
            entry["ways"][way] = {"rc": rc, "wall_s": secs, **got, "log_tail": log[-1500:] if rc else ""}
            print(f"{sweep} {way}: rc {rc}, {secs:.1f} s, span {got['span_s']}", flush=True)
            if rc:
                print(log[-1500:], flush=True)
        p = [w["predictions"] for w in entry["ways"].values()]
        entry["same"] = f"{sum(p[0].get(key) == v for key, v in p[1].items())}/{len(p[1])}"
        data["sweeps"].append(entry)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(table(data))
    print(table(data), flush=True)
    if any(w["rc"] for sw in data["sweeps"] for w in sw["ways"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
