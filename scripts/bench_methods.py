"""`make bench-methods`: every method's cost columns through the real CLI (`scbench run`: runner, store, export), and
the sweep throughput of those runs executed one by one vs grouped + batched (issue 19).

    python scripts/bench_methods.py                          # CUDA: random Llama-3.1-8B-shaped bf16, 32K and 128K
    python scripts/bench_methods.py --lengths 32000 --out $OUT/part32k --deadline 540     # one device call's part
    python scripts/bench_methods.py --combine $OUT/part32k.json $OUT/part128k.json --out results/perf/methods_gpu
    python scripts/bench_methods.py --estimate --lengths 32000 131000                     # device seconds, runs nothing
    python scripts/bench_methods.py --cpu                    # no CUDA (also the default there): embedded model, quick

Per context length, the same `scbench run -m method=<every config> mode=multi_turn,multi_request` sweep runs twice,
each in its own process (the model, built in memory with ``model.path=random:llama-3.1-8b``, once per process):
``sequential`` (``share_prefill=false timing=sequential``: every run alone, one request at a time -- today's
execution, whose rows make the per-method table) and ``grouped`` (``share_prefill=true timing=batched``: one first
prefill per example shared by the dense-prefill methods of a mode, scbench/group.py; independent turns decoded as a
batch, scbench/batch.py). The wall seconds of each sweep (process start to exit, model build included) give
examples per GPU-hour (an example: one (method, mode, example) cell with all its turns) and the speed-up; the
predictions of the two sweeps are compared turn by turn (identical in float32; in bf16 batched decoding changes
kernels, see the README). Each run warms up on dummy prompts first (``warmup_s``, kept out of prefill and decode).
Per method the table gives: first-turn prefill seconds (compression included), later-turn prefill, warm-up seconds,
decode tokens/s (median over turns) and its ratio to full attention in the same (length, mode), the decode path, KV
bytes resident after the first turn, bytes read per decoded token (``loaded_bytes`` for loading methods, else the
resident KV, which a dense decode step reads whole), and peak accelerator memory. Writes ``<out>.json`` and
``<out>.md`` after every sweep; ``--combine`` merges parts (split by length or by mode) and derives the speed-ups.
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
sys.path.insert(0, str(ROOT / "scripts"))
from bench_methods_report import combine, derive, estimate, write  # noqa: E402

DUO_8B = "duo_attention-llama8b" if (ROOT / "configs" / "method" / "duo_attention-llama8b.yaml").is_file() \
    else "duo_attention"
GPU_METHODS = ["full", "streamingllm", "snapkv", "pyramidkv", "h2o", "quest", "kivi", "retrieval_attention-device",
               "ashape", "trishape", "vertical_slash", "kvzip", "adakv", DUO_8B]
"""Every method config at SCBench's budgets (4,096 tokens; KIVI 2-bit); RetrievalAttention's device tier (its host
tier, ``--methods retrieval_attention``, decodes at ~7.5 tok/s at 32K and 4.5 tok/s at 131K, where one run of 2 turns
took 85 s of an H200 call (results/perf/ra_host_131k.md): left out of the default list to keep the bench inside a
session's device time); DuoAttention with gates of the 8B shape where that config exists
(timing-only gates; else ``duo_for_model`` makes some)."""
CPU_METHODS = ["full", "snapkv-1k", "kivi", "ashape-1k", "kvzip-1k"]
"""The quick CPU version: one of each kind (dense, eviction, quantisation, sparse prefill, issue 23)."""
MODES = ["multi_turn", "multi_request"]
WAYS = {"sequential": ["share_prefill=false", "timing=sequential"], "grouped": ["share_prefill=true", "timing=batched"],
        "grouped_sequential": ["share_prefill=true", "timing=sequential"],
        "grouped_per_run": ["share_prefill=true", "timing=batched"]}
"""How a sweep runs: one job at a time (today's execution), grouped + batched (issue 19: shared first prefill,
independent turns decoded as one batch; the key keeps its old name for the checked-in JSON) and grouped alone (shared
prefill, one request at a time: what batching adds on top; ``--ways sequential grouped grouped_sequential``) and
grouped + batched with each run's turns decoded apart (``grouped_per_run``: ``SCBENCH_DECODE_RUNS=0``, what decoding
the runs of a group together adds)."""
WAY_ENV = {"grouped_per_run": {"SCBENCH_DECODE_RUNS": "0"}}
DEFAULT_WAYS = ["sequential", "grouped"]


def run_cli(args: list[str], env: dict, timeout: float | None, log: Path | None = None) -> tuple[int, float, str]:
    """One ``scbench run -m`` process: (exit status, wall seconds, the output's tail); ``log``: the whole output."""
    t0 = time.perf_counter()
    # -P: the installed scbench, not the source folder the command runs in (its methods/ maps to scbench.methods)
    try:
        p = subprocess.run([sys.executable, "-P", "-m", "scbench.cli", "run", "-m", *args], env=env,
                           capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        # the partial output comes as bytes even with text=True
        text = lambda x: x.decode(errors="replace") if isinstance(x, bytes) else x or ""  # noqa: E731
        rc, out = 124, f"{text(e.stdout)}{text(e.stderr)}\n[killed after {timeout:.0f} s]"
    if log is not None:
        log.write_text(out)
    return rc, time.perf_counter() - t0, out[-4000:]


def turn_key(run: dict, turn: dict) -> str:
    """A turn's key across sweeps of the same runs: method label | mode | task | example | turn."""
    return f"{run['method_label']}|{run['mode']}|{run.get('task')}|{turn['example_id']}|{turn['turn']}"


def first_prefills(turns: list[dict]) -> list[float]:
    """Each example's first-turn prefill seconds, in the order the run reached the examples: the first example's
    carries what a warm-up did not reach (cold clocks, a compile for a shape the warm-up did not meet), the later
    ones are what a sweep of many examples pays."""
    seen: dict = {}
    for t in sorted(turns, key=lambda t: t["created"]):
        seen.setdefault(t["example_id"], t["prefill_s"])
    return list(seen.values())


def first_example_warmup(turns: list[dict]) -> float:
    """Warm-up seconds of the first example the run reached: its one-time work (compilation, the first captures). A
    later example's warm-ups, e.g. graph captures that recur with each example, are work a sweep of many examples
    pays per example, so the sweep's steady seconds keep them."""
    if not turns:
        return 0.0
    first = min(turns, key=lambda t: t["created"])["example_id"]
    return sum(t.get("warmup_s") or 0.0 for t in turns if t["example_id"] == first)


def summarize(store_path: str, length: int, way: str) -> tuple[list[dict], dict, dict]:
    """Per-run rows, predictions {method|mode|example|turn: text} and the store's span (first run opened to last
    turn stored) of one sweep's store."""
    from scbench.store import Store

    store = Store(store_path)
    rows, preds, first, last = [], {}, None, None
    try:
        for run in store.runs():
            spec = json.loads(run["spec"]) if isinstance(run.get("spec"), str) else run.get("spec") or {}
            turns = store.turns(run["run_id"])
            first = min(first or run["created"], run["created"])
            row = {"method": run["method_label"], "config": spec.get("method", {}), "length": length,
                   "mode": run["mode"], "task": run.get("task"), "way": way, "status": run.get("status"),
                   "turns": len(turns),
                   "examples": len({t["example_id"] for t in turns})}
            if run.get("error"):
                row["error"] = str(run["error"]).splitlines()[0][:300]
            for t in turns:
                preds[turn_key(run, t)] = t["prediction"]
                last = max(last or t["created"], t["created"])
            if turns:
                first_t, later = min(turns, key=lambda t: t["created"]), [t for t in turns if t["turn"] > 0]
                rates = [t["decode_tok_s"] for t in turns if t["decode_tok_s"]]
                toks = sum(max(0, t["decode_tokens"] - 1) for t in turns)
                loaded = sum(t["loaded_bytes"] or 0 for t in turns)
                row.update(
                    prompt_tokens=first_t["prompt_tokens"], prefill_s=first_t["prefill_s"],
                    first_prefill_s_all=first_prefills(turns),
                    compress_s=first_t["compress_s"], prefill_shared=first_t.get("prefill_shared"),
                    scores_shared=first_t.get("scores_shared"),
                    score_prefill_s=(first_t.get("method_costs") or {}).get("score_prefill_s"),
                    later_prefill_s=statistics.median([t["prefill_s"] for t in later]) if later else None,
                    later_prefill_s_all=[t["prefill_s"] for t in sorted(later, key=lambda t: t["created"])],
                    warmup_s=sum(t.get("warmup_s") or 0.0 for t in turns),
                    first_example_warmup_s=first_example_warmup(turns),
                    retry_s=sum(t.get("retry_s") or 0.0 for t in turns),
                    decode_tok_s=statistics.median(rates) if rates else 0.0, decode_tok_s_all=rates,
                    decode_s_sum=sum(t["decode_s"] or 0.0 for t in turns),
                    decode_path=",".join(sorted({t["decode_path"] for t in turns})),
                    decode_runs=max(t.get("decode_runs") or 1 for t in turns),
                    decode_batch=max(t.get("decode_batch") or 1 for t in turns),
                    kv_bytes=first_t["kv_bytes"], kv_full_bytes=first_t["kv_full_bytes"],
                    bytes_per_token=loaded / toks if loaded and toks else first_t["kv_bytes"],
                    bytes_per_token_source="loaded_bytes" if loaded else "kv_bytes (dense read)",
                    peak_mem_bytes=max(t["peak_mem_bytes"] for t in turns), attn_density=first_t["attn_density"],
                    prefill_fallbacks=(first_t.get("method_costs") or {}).get("prefill_fallbacks"))
            rows.append(row)
    finally:
        store.close()
    for mode in {r["mode"] for r in rows}:
        full = next((r for r in rows if r["mode"] == mode and r["config"].get("name") == "full"
                     and r.get("decode_tok_s")), None)
        for r in rows:
            if full and r["mode"] == mode and r.get("decode_tok_s"):
                r["decode_vs_full"] = r["decode_tok_s"] / full["decode_tok_s"]
                r["prefill_vs_full"] = r["prefill_s"] / full["prefill_s"]
    return rows, preds, {"runs_s": (last - first) if first and last else None,
                         "warmup_s": sum(r.get("first_example_warmup_s") or 0.0 for r in rows),
                         "warmup_all_s": sum(r.get("warmup_s") or 0.0 for r in rows)}


def duo_for_model(methods: list[str], model_cfg: str, tmp: Path) -> tuple[list[str], list[str]]:
    """DuoAttention's gates file is per model shape (calibrated on the embedded model). On a random-weight preset of
    another shape, write a plugin config ``<name>-random`` with seeded random gates of that shape (a random model has
    no heads to calibrate; the costs depend only on the share of retrieval heads) and use it. -> (methods,
    overrides)."""
    from omegaconf import OmegaConf

    from scbench.engines.models import RANDOM_PRESETS

    path = str(OmegaConf.load(ROOT / "configs" / "model" / f"{model_cfg}.yaml").get("path", ""))
    preset = RANDOM_PRESETS.get(path.removeprefix("random:").partition("@")[0]) if path.startswith("random:") else None
    out, plugin = [], None
    for name in methods:
        cfg_file = ROOT / "configs" / "method" / f"{name}.yaml"
        cfg = OmegaConf.to_container(OmegaConf.load(cfg_file)) if cfg_file.is_file() else {}
        if cfg.get("name") != "duo_attention" or preset is None:
            out.append(name)
            continue
        layers, kv = preset["num_hidden_layers"], preset["num_key_value_heads"]
        heads = ROOT / cfg["heads"]
        gates = json.loads(heads.read_text())["gates"] if heads.is_file() else [[]]
        if (len(gates), len(gates[0])) == (layers, kv):
            out.append(name)
            continue
        import torch

        plugin = tmp / "plugins"
        (plugin / "configs" / "method").mkdir(parents=True, exist_ok=True)
        heads = plugin / f"duo_heads_{layers}x{kv}.json"
        g = torch.rand(layers, kv, generator=torch.Generator().manual_seed(0))
        heads.write_text(json.dumps({"what": "random gates (seed 0) for a random-weight model: cost runs only",
                                     "gates": g.tolist()}))
        cfg["heads"] = str(heads)
        (plugin / "configs" / "method" / f"{name}-random.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
        out.append(f"{name}-random")
    return out, [f"plugins={plugin}"] if plugin else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="quick CPU version (the default without CUDA)")
    ap.add_argument("--lengths", type=int, nargs="+")
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--ways", nargs="+", default=DEFAULT_WAYS, choices=list(WAYS))
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--examples", type=int, default=1, help="generated examples per task")
    ap.add_argument("--turns", type=int, default=2, help="turns per example (SCBench's multi-request examples: ~5)")
    ap.add_argument("--tasks", nargs="+", default=["scbench_kv"], help="tasks of the sweep (generated data)")
    ap.add_argument("--max-new", type=int, default=None, help="new tokens per turn (default 64; CPU 16)")
    ap.add_argument("--model", default=None,
                    help="model config (default random-llama-3.1-8b on CUDA, smollm2-135m on CPU; tiny-llama: seconds)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for the random model (model.tokenizer)")
    ap.add_argument("--commit", default=os.environ.get("SCBENCH_COMMIT"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for this whole call: the time left is shared between the remaining sweeps in "
                         "proportion to their estimates; a sweep past its share is stopped (its finished runs are "
                         "kept, the JSON says partial) and the JSON / md are written after every sweep")
    ap.add_argument("--grouped-optional", action="store_true",
                    help="with --deadline: the sequential sweep may use all the time; the grouped one runs only if "
                         "its estimate fits in what is left")
    ap.add_argument("--estimate", action="store_true", help="print the device-time estimate and exit")
    ap.add_argument("--measured", default=str(ROOT / "results" / "perf" / "methods_gpu.json"),
                    help="the measured JSON the estimate reads (default: the checked-in one)")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    ap.add_argument("--logs", default=None, help="folder for each sweep's whole output (<length>-<way>.log)")
    ap.add_argument("--combine", nargs="+", help="merge the JSON files of earlier calls into --out (no runs)")
    a = ap.parse_args()
    if a.combine:
        return combine(a.combine, Path(a.out))
    import torch

    cpu = a.cpu or not (a.estimate or torch.cuda.is_available())  # an estimate is of the GPU run
    lengths = a.lengths or ([1000] if cpu else [32000, 131000])
    methods = a.methods or (CPU_METHODS if cpu else GPU_METHODS)
    max_new = a.max_new or (16 if cpu else 64)
    model_cfg = a.model or ("smollm2-135m" if cpu else "random-llama-3.1-8b")
    model = [f"model={model_cfg}"] + (["model.device=cpu"] if cpu else [])
    if a.tokenizer:
        model.append(f"model.tokenizer={a.tokenizer}")
    plan = {"text": "CPU: no device-time estimate", "total_s": None, "sweeps": {}} if cpu else estimate(
        Path(a.measured), methods, lengths, a.modes, a.ways, a.turns, max_new, a.examples * len(a.tasks), a.extra)
    print(plan["text"], flush=True)
    if a.estimate:
        return
    out = Path(a.out or ROOT / "results" / "perf" / ("methods_cpu" if cpu else "methods_gpu"))
    # --dirty: a copy whose files differ from its HEAD says so (a lent GPU box's copy can carry a stale .git: pass
    # --commit there)
    commit = a.commit or subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"],
                                        capture_output=True, text=True).stdout.strip() or "unknown"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    if a.logs:
        Path(a.logs).mkdir(parents=True, exist_ok=True)
    methods, plugin = duo_for_model(methods, model_cfg, tmp)
    info = {"device": torch.cuda.get_device_name() if not cpu else "cpu", "torch": torch.__version__,
            "commit": commit, "model": model, "task": ",".join(a.tasks), "tasks": a.tasks, "turns": a.turns,
            "max_new_tokens": max_new, "examples": a.examples, "methods": methods, "estimate_s": plan["total_s"],
            "all_methods": len(GPU_METHODS),
            "note": "decode tok/s: median over the turns of each run; warm-up kept out of prefill and decode times; "
                    "sweep wall: one scbench process per (length, way), model build included"}
    data = {**info, "rows": [], "sweeps": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    write(out, derive(data))  # a call killed from outside still leaves its header
    t_start = time.perf_counter()
    variant = " ".join(a.extra)  # sweeps under other overrides are other table entries (report.derive)
    todo = [(length, way) for length in lengths for way in a.ways]
    for k, (length, way) in enumerate(todo):
        left = a.deadline - (time.perf_counter() - t_start) if a.deadline else None
        need = plan["sweeps"].get(f"{length}-{way}")
        later = [plan["sweeps"].get(f"{n}-{w}") or 1.0 for n, w in todo[k + 1:]]
        share = left
        if left is not None and not (a.grouped_optional and way == "sequential"):
            share = left * (need or 1.0) / ((need or 1.0) + sum(later)) if later else left
        if left is not None and a.grouped_optional and way != "sequential" and need is not None and need > left:
            print(f"{length} {way}: skipped, estimated {need:.0f} s > {left:.0f} s left", flush=True)
            data["sweeps"].append({"length": length, "way": way, "modes": a.modes, "extra": variant, "skipped": True,
                                   "estimate_s": need})
            continue
        store = tmp / f"{length}-{way}.sqlite"
        rc, secs, log = run_cli([*model, f"method={','.join(methods)}", f"task={','.join(a.tasks)}",
                                 f"mode={','.join(a.modes)}", f"data.length={length}", f"data.n={a.examples}",
                                 f"data.turns={a.turns}", f"max_turns={a.turns}", f"max_new_tokens={max_new}",
                                 f"store={store}", "progress=false", *WAYS[way], *plugin,
                                 f"hydra.sweep.dir={tmp}/hydra-{length}-{way}", *a.extra], {**env, **WAY_ENV.get(way, {})},
                                timeout=max(1.0, share) if share is not None else None,
                                log=Path(a.logs) / f"{length}-{way}.log" if a.logs else None)
        rows, preds, span = summarize(str(store), length, way) if store.exists() else ([], {}, {})
        for r in rows:
            r["extra"] = variant
        cells = sum(r["examples"] for r in rows if r["status"] == "done")
        expected = len(methods) * len(a.modes) * a.examples * len(a.tasks)
        data["rows"] += rows
        data["sweeps"].append({"length": length, "way": way, "modes": a.modes, "methods": len(methods),
                               "extra": variant, "rc": rc, "wall_s": secs, **span, "runs": len(rows), "cells": cells,
                               "expected_cells": expected, "partial": cells < expected, "share_s": share,
                               "failed": [f"{r['method']} {r['mode']}: {r.get('error', r['status'])}"
                                          for r in rows if r["status"] != "done"],
                               "estimate_s": need, "predictions": preds, "log_tail": log})
        print(f"{length} {way}: rc {rc}, {secs:.0f} s (estimated {need or 0:.0f} s), {cells} examples done",
              flush=True)
        if rc:
            print(log[-1500:], flush=True)
        write(out, derive(data))


if __name__ == "__main__":
    main()
