"""How far do the fast paths move a real model's predictions? Every method config through `scbench run` on a real
model in its own dtype (bf16 on a GPU), each way of executing the sweep against the plain reference loop.

    python scripts/bench_agreement.py --model smollm2-135m --out results/perf/agreement_smollm2_h200   # CUDA
    python scripts/bench_agreement.py --model tiny-llama --methods full snapkv-1k --length 300         # CPU, seconds
    python scripts/bench_agreement.py --combine $OUT/a.json $OUT/b.json --out results/perf/agreement_x

Ways (one `scbench run -m method=... mode=... task=...` sweep each, own store, the same generated data):

- ``plain``: ``share_prefill=false timing=sequential +model.decode=plain`` -- every run alone, the reference decode
  loop (a DynamicCache, the method's own torch code): the reference the others are compared with.
- ``fast``: ``share_prefill=false timing=sequential`` -- ``model.decode=auto``: on CUDA the pre-allocated cache
  stepped as a CUDA graph with each method's decode plugin and Triton kernels (Quest's page select, KIVI's packed
  attention, RetrievalAttention's top-k; issue 18).
- ``grouped``: ``share_prefill=true timing=sequential`` -- one first prefill per example shared by the dense-prefill
  methods, forked per method (scbench/group.py; issue 19), decoded one request at a time.
- ``batched``: ``share_prefill=true timing=batched`` -- the default of a sweep: grouped, and an example's
  independent turns decoded as one batch with the shared-prefix kernel (scbench/batch.py).
- ``plain_fp32``, ``fast_fp32``, ``grouped_fp32``, ``batched_fp32`` (not run by default): the same in float32.
  ``--reference plain_fp32`` compares every other way with the plain float32 loop: the bf16 plain loop's distance
  from it is the noise floor bf16 arithmetic alone sets; the float32 fast ways' distance is what the fast paths
  change on a GPU with the rounding nearly out of the way (their kernels still sum in another order, so a near tie
  may still flip; more than a few differing turns points to a bug, as the bf16 radix select's was).

In float32 on the CPU the first four give identical predictions (tests/e2e/test_sweep_grouped.py,
tests/engines/test_fast_decode.py, tests/engines/test_batched_decode.py). In bf16 any change of kernel changes the
rounding, so greedy decoding can take another token where two are nearly tied; on a random-weight model that happens
within a few steps (no token is ever clearly ahead), which says nothing about a trained model. This measures it on
one. Per (way, method, mode) against ``plain`` (``--reference``): turns compared, turns with the identical prediction,
the tokens in common before the first difference over the longer answer's length, the mean per-turn score of each
(the task's metric, as the leaderboard averages it) and how many turns' scores differ. Writes ``<out>.json`` and ``<out>.md``.
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
from bench_methods import run_cli, turn_key  # noqa: E402
from bench_methods_report import short  # noqa: E402

WAYS = {"plain": ["share_prefill=false", "timing=sequential", "+model.decode=plain"],
        "fast": ["share_prefill=false", "timing=sequential"],
        "grouped": ["share_prefill=true", "timing=sequential"],
        "batched": ["share_prefill=true", "timing=batched"]}
WAYS.update({f"{way}_fp32": [*overrides, "model.dtype=float32"] for way, overrides in list(WAYS.items())})
DEFAULT_WAYS = ["plain", "fast", "grouped", "batched"]
REFERENCE = "plain"
"""The way the others are compared with (``--reference``: ``plain_fp32`` asks how far each bf16 way, the plain loop
included, is from float32 arithmetic: the noise floor the fast paths are judged against)."""
METHODS = ["full", "streamingllm", "snapkv", "pyramidkv", "h2o", "quest", "kivi", "retrieval_attention-device",
           "retrieval_attention", "ashape", "trishape", "vertical_slash", "kvzip", "adakv", "duo_attention"]
"""Every method config at SCBench's budgets (the smollm2-calibrated DuoAttention gates), both RetrievalAttention
tiers."""


def collect(store_path: str) -> tuple[dict, list[dict]]:
    """{method|mode|task|example|turn: {prediction, score, decode_path}} and the runs (label, config, mode, status,
    error) of one sweep's store."""
    from scbench.store import Store

    store = Store(store_path)
    turns, runs = {}, []
    try:
        for run in store.runs():
            spec = json.loads(run["spec"]) if isinstance(run.get("spec"), str) else run.get("spec") or {}
            runs.append({"method": run["method_label"], "config": spec.get("method", {}), "mode": run["mode"],
                         "task": run.get("task"), "status": run.get("status"),
                         "error": str(run["error"]).splitlines()[0][:300] if run.get("error") else None})
            for t in store.turns(run["run_id"]):
                scores = [v for v in (t["scores"] or {}).values() if isinstance(v, (int, float))]
                turns[turn_key(run, t)] = {
                    "prediction": t["prediction"], "score": sum(scores) / len(scores) if scores else None,
                    "decode_path": t.get("decode_path"), "decode_batch": t.get("decode_batch")}
    finally:
        store.close()
    return turns, runs


def leading_share(ref: list[int], other: list[int]) -> float:
    """Tokens in common before the first difference over the longer answer's length: 1.0 only for identical
    answers (two empty answers too)."""
    longest = max(len(ref), len(other))
    if not longest:
        return 1.0
    n = 0
    for a, b in zip(ref, other):
        if a != b:
            break
        n += 1
    return n / longest


def compare(ways: dict[str, dict], encode, reference: str = REFERENCE) -> list[dict]:
    """Per (way, method, mode): each non-reference way's turns against the reference way's turns of the same key.
    ``encode``: text -> token ids (the model's tokenizer; the leading share counts tokens)."""
    ref = ways.get(reference) or {}
    groups: dict[tuple, list[str]] = {}
    for key in ref:
        method, mode = key.split("|")[:2]
        groups.setdefault((method, mode), []).append(key)
    ref_ids = {k: encode(t["prediction"]) for k, t in ref.items()}  # once, not once per way
    out = []
    for way, turns in ways.items():
        if way == reference:
            continue
        for (method, mode), keys in sorted(groups.items()):
            both = [k for k in keys if k in turns]
            if not both:
                out.append({"way": way, "method": method, "mode": mode, "turns": 0, "missing": len(keys)})
                continue
            same = sum(turns[k]["prediction"] == ref[k]["prediction"] for k in both)
            shares = [leading_share(ref_ids[k], encode(turns[k]["prediction"])) for k in both]
            sr = [ref[k]["score"] for k in both if ref[k]["score"] is not None]
            sw = [turns[k]["score"] for k in both if turns[k]["score"] is not None]
            out.append({"way": way, "method": method, "mode": mode, "turns": len(both),
                        "missing": len(keys) - len(both), "same": same,
                        "leading_share": statistics.mean(shares),
                        "score_ref": statistics.mean(sr) if sr else None,
                        "score": statistics.mean(sw) if sw else None,
                        "score_changed": sum(1 for k in both if turns[k]["score"] != ref[k]["score"]),
                        "paths": sorted({str(turns[k]["decode_path"]) for k in both})})
    return out


def table(data: dict) -> str:
    rows = data["comparison"]
    reference = data.get("reference", REFERENCE)
    labels = {r["method"]: short(r) for r in data.get("runs", [])}
    dtype = data["dtype"] + ("; the *_fp32 ways float32" if any(s["way"].endswith("_fp32") for s in data["sweeps"])
                             and "float32 (auto)" not in data["dtype"] else "")
    lines = [f"# Prediction agreement on {data['model']} ({dtype}, {data['device']}, torch {data['torch']}, "
             f"commit {data['commit']})", "",
             f"`scripts/bench_agreement.py`: `scbench run` over {', '.join(data['tasks'])} (generated data, "
             f"{data['length']} context tokens, {data['examples']} example(s) per task, {data['turns']} turns of at "
             f"most {data['max_new_tokens']} new tokens), every way against `{reference}` "
             f"({' '.join(WAYS[reference])}). same: turns with the identical prediction; leading: mean tokens in "
             "common before the first difference over the longer answer's length; score: mean per-turn score "
             "(reference -> this "
             "way) and the turns whose score changed.", ""]
    for way in [w for w in WAYS if w != reference and any(r["way"] == w for r in rows)]:
        sel = [r for r in rows if r["way"] == way]
        n = sum(r["turns"] for r in sel)
        same = sum(r.get("same", 0) for r in sel)
        changed = sum(r.get("score_changed", 0) for r in sel)
        scored = [r for r in sel if r["turns"] and r.get("score_ref") is not None and r.get("score") is not None]
        mean = ""
        if scored:  # turn-weighted over the (method, mode) rows both ways scored
            w = sum(r["turns"] for r in scored)
            mean = (f", mean score {sum(r['score_ref'] * r['turns'] for r in scored) / w:.3f} -> "
                    f"{sum(r['score'] * r['turns'] for r in scored) / w:.3f}")
        lines += [f"## {way} ({' '.join(WAYS[way])}): {same}/{n} turns identical, {changed} scores changed{mean}", "",
                  "| mode | method | turns | same | leading | score | score changed | decode path |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sel:
            if not r["turns"]:
                lines.append(f"| {r['mode']} | {labels.get(r['method'], r['method'])} | 0 (missing {r['missing']}) "
                             "| | | | | |")
                continue
            sc = (f"{r['score_ref']:.3f} -> {r['score']:.3f}" if r["score_ref"] is not None and r["score"] is not None
                  else "-")
            lines.append(f"| {r['mode']} | {labels.get(r['method'], r['method'])} | {r['turns']}"
                         f"{' (missing ' + str(r['missing']) + ')' if r['missing'] else ''} | {r['same']} | "
                         f"{r['leading_share']:.2f} | {sc} | {r['score_changed']} | {','.join(r['paths'])} |")
        lines.append("")
    failed = [f"{s['way']}: {f}" for s in data["sweeps"] for f in s.get("failed", [])]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {f}" for f in failed] + [""]
    return "\n".join(lines)


def finish(data: dict, out: Path, encode) -> None:
    data["comparison"] = compare({s["way"]: s["turns"] for s in data["sweeps"]}, encode,
                                 data.get("reference", REFERENCE))
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(table(data))


def tokenizer_encode(model_path: str | None):
    """Token ids by the model's tokenizer (characters when none loads)."""
    if model_path:
        try:
            from transformers import AutoTokenizer

            from scbench.engines.models import resolve

            tok = AutoTokenizer.from_pretrained(resolve(model_path))
            return lambda text: tok.encode(text, add_special_tokens=False)
        except (OSError, ValueError) as e:
            print(f"tokenizer of {model_path} not loaded ({e}): the leading share counts characters", flush=True)
    return lambda text: [ord(c) for c in text]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model config (configs/model/)")
    ap.add_argument("--model-path", default=None, help="model.path override (a converted folder)")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--modes", nargs="+", default=["multi_turn", "multi_request"])
    ap.add_argument("--tasks", nargs="+", default=["scbench_kv", "scbench_mf"])
    ap.add_argument("--ways", nargs="+", default=DEFAULT_WAYS, choices=list(WAYS))
    ap.add_argument("--reference", default=REFERENCE, choices=list(WAYS), help="the way the others are compared with")
    ap.add_argument("--length", type=int, default=6000, help="context tokens of the generated rows")
    ap.add_argument("--examples", type=int, default=1)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--commit", default=os.environ.get("SCBENCH_COMMIT"))
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for all the sweeps: each gets a share of what is left (a plain loop twice the "
                         "others'); a sweep past its share is stopped and keeps its finished runs' turns")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--combine", nargs="+", help="merge the sweeps of earlier JSON files (no runs)")
    a = ap.parse_args()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.combine:
        parts = [json.loads(Path(p).read_text()) for p in a.combine]
        data = {**parts[0], "sweeps": [s for p in parts for s in p["sweeps"]],
                "runs": [r for p in parts for r in p.get("runs", [])]}
        return finish(data, out, tokenizer_encode(data.get("model_path")))
    import torch

    cuda = torch.cuda.is_available()
    model = [f"model={a.model}"] + ([f"model.path={a.model_path}"] if a.model_path else [])
    model += [] if cuda else ["model.device=cpu"]
    commit = a.commit or subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=7"],
                                        capture_output=True, text=True).stdout.strip() or "unknown"
    from omegaconf import OmegaConf

    cfg_path = a.model_path or str(OmegaConf.load(ROOT / "configs" / "model" / f"{a.model}.yaml").get("path", ""))
    data = {"model": a.model, "model_path": cfg_path, "dtype": "bfloat16 (auto)" if cuda else "float32 (auto)",
            "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "commit": commit,
            "tasks": a.tasks, "length": a.length, "examples": a.examples, "turns": a.turns,
            "max_new_tokens": a.max_new, "methods": a.methods, "modes": a.modes, "reference": a.reference,
            "sweeps": [], "runs": []}
    encode = tokenizer_encode(cfg_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-agreement-"))
    t0 = time.perf_counter()
    if a.reference not in a.ways:
        ap.error(f"--reference {a.reference} must be one of --ways {a.ways}")
    weight = {w: 2.0 if w.startswith("plain") else 1.0 for w in a.ways}
    for k, way in enumerate(a.ways):
        share = None
        if a.deadline is not None:
            left = a.deadline - (time.perf_counter() - t0)
            share = max(1.0, left * weight[way] / sum(weight[w] for w in a.ways[k:]))
        store = tmp / f"{way}.sqlite"
        rc, secs, log = run_cli([*model, f"method={','.join(a.methods)}", f"task={','.join(a.tasks)}",
                                 f"mode={','.join(a.modes)}", f"data.length={a.length}", f"data.n={a.examples}",
                                 f"data.turns={a.turns}", f"max_turns={a.turns}", f"max_new_tokens={a.max_new}",
                                 f"store={store}", "progress=false", *WAYS[way],
                                 f"hydra.sweep.dir={tmp}/hydra-{way}", *a.extra], env, timeout=share)
        turns, runs = collect(str(store)) if store.exists() else ({}, [])
        if not data["runs"]:
            data["runs"] = runs
        data["sweeps"].append({"way": way, "overrides": WAYS[way], "rc": rc, "wall_s": secs, "share_s": share,
                               "turns": turns,
                               "failed": [f"{r['method']} {r['mode']} {r['task']}: {r['error'] or r['status']}"
                                          for r in runs if r["status"] != "done"], "log_tail": log})
        print(f"{way}: rc {rc}, {secs:.0f} s, {len(turns)} turns", flush=True)
        if rc:
            print(log[-1500:], flush=True)
        finish(data, out, encode)
        print(out.with_suffix(".md").read_text().split("\n## ")[-1][:2000] if way != a.reference else "", flush=True)
    print(out.with_suffix(".md").read_text(), flush=True)


if __name__ == "__main__":
    main()
