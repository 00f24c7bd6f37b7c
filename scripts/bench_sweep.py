"""`make bench-sweep`: a small sweep run three ways -- sequential (every run alone, one request at a time), grouped
(one first prefill per example shared by the sweep's methods, scbench/group.py) and grouped + batched (independent
turns decoded together, scbench/batch.py) -- on the Llama-3.1-8B shape with random bf16 weights; examples per
GPU-hour of each, and how many predictions the faster ways share with the sequential one.

    python scripts/bench_sweep.py                               # a GPU: 32K, 6 methods x 2 modes x 3 tasks
    python scripts/bench_sweep.py --lengths 32768 131072 --tasks scbench_kv --examples 1 --max-new 64
    python scripts/bench_sweep.py --cpu                         # quick look: tiny random Llama, float32, CPU

An "example" is one (method, mode, task, example) cell of the sweep, all its turns included. Every way runs the
same cells into its own fresh store after a warm-up (graph capture and kernel compilation excluded). Times are
wall-clock seconds of the whole sweep in one process (data generation excluded: the same for every way).
Writes JSON after every (length, way) to ``--out`` (default results/perf/sweep_{gpu,cpu}.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS_GPU = {
    "full": {"name": "full"},
    "snapkv-4096": {"name": "snapkv", "budget": 4096},
    "pyramidkv-4096": {"name": "pyramidkv", "budget": 4096},
    "streamingllm-4096": {"name": "streamingllm", "n_init": 128, "n_local": 3968},
    "snapkv-1024": {"name": "snapkv", "budget": 1024},
    "streamingllm-1024": {"name": "streamingllm", "n_init": 128, "n_local": 896},
}
METHODS_CPU = {
    "full": {"name": "full"},
    "snapkv-96": {"name": "snapkv", "budget": 96, "window": 8},
    "pyramidkv-96": {"name": "pyramidkv", "budget": 96, "window": 8},
    "streamingllm-96": {"name": "streamingllm", "n_init": 8, "n_local": 88},
    "snapkv-48": {"name": "snapkv", "budget": 48, "window": 8},
    "streamingllm-48": {"name": "streamingllm", "n_init": 8, "n_local": 40},
}
WAYS = {"sequential": (False, "sequential"), "grouped": (True, "sequential"), "grouped+batched": (True, "batched")}


_DATA: dict = {}


def cached_examples(task, source, *, count=None, **kw):
    """``load_examples`` memoised per (task, arguments): generated rows are the same for every way, and making them
    (tokenising a long context to hit its length) is not what the ways differ in."""
    key = (task.name, source, json.dumps(kw, sort_keys=True, default=str))
    if key not in _DATA:
        _DATA[key] = _load_examples(task, source, count=count, **kw)
    return list(_DATA[key])


def _patch_data() -> None:
    import scbench.data
    import scbench.run

    global _load_examples
    _load_examples = scbench.data.load_examples
    scbench.data.load_examples = scbench.run.load_examples = cached_examples


def build_engine(cpu: bool, tok_folder: str | None):
    from transformers import AutoTokenizer

    from scbench.engines.hf import HFEngine
    from scbench.engines.models import random_model, resolve

    tok = AutoTokenizer.from_pretrained(tok_folder or resolve("embedded:smollm2"))
    if cpu:
        model = random_model("tiny-llama", tokenizer=tok)
        return HFEngine("random:tiny-llama", name="random:tiny-llama", model=model, tokenizer=tok, device="cpu",
                        dtype="float32")
    model = random_model("llama-3.1-8b", tokenizer=tok, dtype=torch.bfloat16, device="cuda")
    return HFEngine("random:llama-3.1-8b", name="random:llama-3.1-8b", model=model, tokenizer=tok, device="cuda",
                    dtype="bfloat16")


def jobs_for(methods: dict, tasks, modes, length: int, examples: int, turns: int, max_new: int | None, store: str):
    from scbench.group import Job
    from scbench.records import RunSpec

    out = []
    for task in tasks:
        for mode in modes:
            for cfg in methods.values():
                spec = RunSpec(model={"name": "bench"}, method=cfg, task=task, mode=mode,
                               data={"n": examples, "length": length, "turns": turns, "seed": 0}, max_turns=turns,
                               max_new_tokens=max_new, max_seq_length=max(length + 4096, 8192))
                out.append(Job(spec, store, progress=False))
    return out


def run_way(engine, jobs, way: str, store: str) -> float:
    from scbench.group import run_jobs

    group, timing = WAYS[way]
    for j in jobs:
        j.store, j.timing = store, timing
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outcomes = run_jobs(jobs, group=group, engine=engine)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    bad = [o for o in outcomes if o.error is not None]
    if bad:
        raise RuntimeError(f"{way}: {len(bad)} run(s) failed, first: {bad[0].error!r}")
    return time.perf_counter() - t0


def predictions(store: str) -> dict:
    from scbench.store import Store

    s = Store(store)
    out = {(t["run_id"], t["example_id"], t["turn"]): t["prediction"] for t in s.turns()}
    extra = {"prefill_s_turn0": sum(t["prefill_s"] for t in s.turns() if t["turn"] == 0),
             "decode_s": sum(t["decode_s"] for t in s.turns()),
             "turns": len(out), "batched_turns": sum(1 for t in s.turns() if t["decode_path"] == "batched")}
    s.close()
    return out, extra


REFERENCE_METHODS = ("full,streamingllm-1k,snapkv-1k,pyramidkv-1k,h2o-1k,kivi,kivi-4bit,ashape-1k,trishape-1k,"
                     "vertical_slash-1k,quest-1k,retrieval_attention-1k,ppl_compress,cacheblend").split(",")
"""The 14 method configs of ``sweep=reference`` (every method the hf engine runs offline)."""


def project(report: dict, examples: int = 931, modes: int = 2) -> dict:
    """GPU-hours of SCBench (``examples`` sessions x ``modes``) x the 14 reference methods, before and after, from one
    length's measured rows. Per (example, mode): ``P`` = a cell's first prefill, ``r_seq`` = the rest of a cell run
    alone and sequentially, ``r_batched`` = the rest of a cell in a grouped + batched run (its prefill shared).
    Before: 14 x (P + r_seq). After: one shared P for the methods declaring ``dense_prefill``; each of them adds
    r_batched if its turns can be batched, else r_seq; every other method runs alone, P + r_batched (or r_seq).
    Assumes every method costs what the measured ones (full / SnapKV / StreamingLLM) cost; it ignores slower
    prefills (H2O, vertical-slash) and slower decode loops (KIVI, Quest, RetrievalAttention)."""
    from omegaconf import OmegaConf

    from scbench.batch import fallback_reason
    from scbench.cli import config_dir
    from scbench.group import can_share
    from scbench.records import RunSpec
    from scbench.run import build_method

    rows = {r["way"]: r for r in report["rows"]}
    seq, gb = rows["sequential"], rows["grouped+batched"]
    n_methods = len(report["methods"])
    groups = seq["cells"] / n_methods
    p = seq["prefill_s_turn0"] / seq["cells"]
    r_seq = (seq["seconds"] - seq["cells"] * p) / seq["cells"]
    r_bat = (gb["seconds"] - groups * p) / gb["cells"]
    engine = type("E", (), {"offload": None, "name": "hf"})()
    spec = RunSpec(model={}, method={}, task="scbench_kv", mode="multi_request")
    kinds = {}
    for name in REFERENCE_METHODS:
        method = build_method(OmegaConf.to_container(OmegaConf.load(config_dir() / "method" / f"{name}.yaml")))
        batch = fallback_reason(engine, method, spec, check_engine=False) is None
        kinds[name] = ("shared" if can_share(type(method)) else "alone", "batched" if batch else "sequential")
    before = len(kinds) * (p + r_seq)
    shared = [k for k in kinds.values() if k[0] == "shared"]
    after = (p if shared else 0) + sum(r_bat if b == "batched" else r_seq for _, b in shared)
    after += sum(p + (r_bat if b == "batched" else r_seq) for a, b in kinds.values() if a == "alone")
    hours = lambda s: examples * modes * s / 3600  # noqa: E731
    return {"length": seq["length"], "P_s": p, "rest_sequential_s": r_seq, "rest_batched_s": r_bat, "methods": kinds,
            "per_example_mode_s_before": before, "per_example_mode_s_after": after,
            "gpu_hours_before": hours(before), "gpu_hours_after": hours(after), "speedup": before / after,
            "examples": examples, "modes": modes}


def shared_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--tasks", nargs="+", default=["scbench_kv", "scbench_qa_eng", "scbench_vt"])
    p.add_argument("--modes", nargs="+", default=["multi_turn", "multi_request"])
    p.add_argument("--methods", nargs="+", default=None, help="names of the preset method table")
    p.add_argument("--examples", type=int, default=2)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--max-new", type=int, default=None, help="cap on every turn's generation (default: the task's)")
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded model's)")
    p.add_argument("--out", default=None)
    p.add_argument("--project", default=None, metavar="JSON",
                   help="print the projection of SCBench x the 14 reference methods x 2 modes from a measured file")
    a = p.parse_args(argv)
    if a.project:
        print(json.dumps(project(json.loads(Path(a.project).read_text())), indent=1))
        return
    cpu = a.cpu or not torch.cuda.is_available()
    _patch_data()
    table = METHODS_CPU if cpu else METHODS_GPU
    methods = {k: table[k] for k in (a.methods or table)}
    lengths = a.lengths or ([600] if cpu else [32768])
    out = Path(a.out or f"results/perf/sweep_{'cpu' if cpu else 'gpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    t_build = time.perf_counter()
    engine = build_engine(cpu, a.tokenizer)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"code": commit or "unknown", "command": " ".join(sys.argv), "device": engine.describe()["device_name"], "model": engine.model_name, "dtype": str(engine.dtype),
              "torch": torch.__version__, "python": platform.python_version(), "build_s": time.perf_counter() - t_build,
              "methods": methods, "tasks": a.tasks, "modes": a.modes, "examples": a.examples, "turns": a.turns,
              "max_new": a.max_new, "rows": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    # warm-up: every way once on a short example (kernels, graphs, allocator), not timed
    warm = jobs_for(methods, a.tasks[:1], a.modes, 2048 if not cpu else 300, 1, 2, 8, "")
    for way in a.ways:
        run_way(engine, warm, way, str(tmp / f"warm-{way}.sqlite"))
    for length in lengths:
        jobs = jobs_for(methods, a.tasks, a.modes, length, a.examples, a.turns, a.max_new, "")
        cells = len(jobs) * a.examples
        from scbench.registry import TASKS

        for task in a.tasks:  # generate the data once, outside the timed runs (every way reads the cached rows)
            cached_examples(TASKS.get(task), "generated", n=a.examples, length=length, turns=a.turns, seed=0,
                            count=lambda t: len(engine.encode(t, add_special_tokens=False)))
        ref = None
        for way in a.ways:
            store = str(tmp / f"{length}-{way}.sqlite")
            seconds = run_way(engine, jobs, way, store)
            preds, extra = predictions(store)
            row = {"length": length, "way": way, "cells": cells, "seconds": seconds,
                   "examples_per_gpu_hour": cells / (seconds / 3600), **extra}
            if way == "sequential":
                ref = preds
            elif ref is not None:
                same = sum(preds.get(k) == v for k, v in ref.items())
                row["same_predictions"] = f"{same}/{len(ref)}"
                row["mean_shared_prefix_chars"] = sum(shared_prefix(preds.get(k, ""), v) for k, v in ref.items()) / len(ref)
                row["mean_prediction_chars"] = sum(len(v) for v in ref.values()) / len(ref)
                seq = next(r for r in report["rows"] if r["length"] == length and r["way"] == "sequential")
                row["speedup"] = seq["seconds"] / seconds
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
