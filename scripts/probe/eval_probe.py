"""Evaluate the smollm2-135m-probe adapter through scbench's own runner (Replay) on fresh seeds.

    python scripts/probe/eval_probe.py --adapter models/smollm2-135m-probe --device cuda \
        --out results/reference/probe_eval.json

Targets (issue 6), full attention, generated data the adapter never saw (seeds in probe_data.EVAL_SEEDS,
checked against the training seed range recorded in the adapter config):
  multi-turn scbench_kv, scbench_prefix_suffix, scbench_vt >= 90 on every turn at 4K tokens and >= 80 at 7K;
  passkey at 7.5K >= 95; three ordinary chat questions answered sensibly (printed).
The engine is HFEngine with the adapter merged by scbench.engines.models.merge_adapter (the shipped path).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import probe_data  # a sibling: the script's folder is on sys.path when it runs

CHAT = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a Python function that returns the square of a number.",
)


def run_cell(engine, task, mode: str, method_cfg: dict, n: int, length: int, turns: int, seed: int) -> dict:
    from scbench.data import load_examples
    from scbench.run import build_method
    from scbench.records import RunSpec
    from scbench.runner import Replay

    count = lambda t: len(engine.encode(t, add_special_tokens=False))  # noqa: E731
    examples = load_examples(task, "generated", n=n, length=length, turns=turns, seed=seed, count=count)
    spec = RunSpec(model={}, method=dict(method_cfg), task=task.name, mode=mode, max_turns=turns,
                   max_seq_length=engine.window)
    per_turn: dict[int, list[float]] = {}
    prompt_tokens: dict[int, list[int]] = {}
    samples = []
    t0 = time.time()
    for ex in examples:
        method = build_method(method_cfg)
        for r in Replay(engine, method, task, ex, spec):
            score = next(iter(r.scores.values()))
            per_turn.setdefault(r.turn, []).append(score)
            prompt_tokens.setdefault(r.turn, []).append(r.prompt_tokens)
            if score < 1 and len(samples) < 3:
                samples.append({"example": ex.id, "turn": r.turn, "prediction": r.prediction[:200],
                                "answer": r.reference["answer"]})
    scores = {t: round(100 * sum(v) / len(v), 1) for t, v in sorted(per_turn.items())}
    return {
        "task": task.name, "mode": mode, "method": method_cfg["name"], "n": len(examples), "length": length,
        "turns": turns, "seed": seed,
        "per_turn": [scores[t] for t in sorted(scores)],
        "mean": round(sum(scores.values()) / len(scores), 1),
        "prompt_tokens_per_turn": [round(sum(v) / len(v)) for _, v in sorted(prompt_tokens.items())],
        "seconds": round(time.time() - t0, 1),
        "misses": samples,
    }


def chat(engine, question: str, max_new: int = 120) -> str:
    from scbench.run import build_method

    text = engine.render_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    s = engine.session(build_method({"name": "full"}))
    s.feed(engine.encode(text, add_special_tokens=True), compress=False, sparse=False)
    return s.generate(max_new).text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default="models/smollm2-135m-probe", help="adapter folder ('' for the base model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=20, help="examples per cell")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--lengths", default="4000,7000")
    ap.add_argument("--tasks", default="scbench_kv,scbench_prefix_suffix,scbench_vt")
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--passkey-length", type=int, default=7500)
    ap.add_argument("--passkey-turns", type=int, default=3)
    ap.add_argument("--passkey-n", type=int, default=20)
    ap.add_argument("--chat-tokens", type=int, default=120)
    ap.add_argument("--multi-request", default="", help="also run these lengths in multi-request mode (informational)")
    args = ap.parse_args()

    from scbench.engines.hf import HFEngine
    from scbench.registry import TASKS

    if args.adapter:
        cfg = json.loads((Path(args.adapter) / "adapter_config.json").read_text())["training"]
        lo, hi = cfg["train_seed_min"], cfg["train_seed_max"]
        assert not lo <= args.seed <= hi, f"evaluation seed {args.seed} lies in the training seed range [{lo}, {hi}]"
        assert args.seed in probe_data.EVAL_SEEDS, f"use an evaluation seed from probe_data.EVAL_SEEDS, not {args.seed}"
        probe_data.check_disjoint(range(lo, hi + 1), {args.seed})
    if torch.cuda.is_available():  # cuDNN attention builds a plan per new length (every decode step): avoid it
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]).__enter__()
    t0 = time.time()
    engine = HFEngine("embedded:smollm2", name="smollm2-135m-probe" if args.adapter else "smollm2-135m",
                      device=args.device, adapter=args.adapter or None)
    result = {"model": engine.describe(), "adapter": args.adapter, "seed": args.seed, "cells": [], "chat": [],
              "load_s": round(time.time() - t0, 1), "command": " ".join(sys.argv)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(result, indent=1) + "\n")

    for q in CHAT:
        a = chat(engine, q, args.chat_tokens)
        result["chat"].append({"question": q, "answer": a})
        print(f"CHAT Q: {q}\nCHAT A: {a}\n", flush=True)
    save()
    full = {"name": "full"}
    cells = []
    pk = probe_data.PasskeyTask("repeat")
    cells.append((pk, "multi_turn", args.passkey_length, args.passkey_turns, args.passkey_n))
    for length in [int(x) for x in args.lengths.split(",") if x]:
        for name in args.tasks.split(","):
            cells.append((TASKS.get(name), "multi_turn", length, args.turns, args.n))
    for length in [int(x) for x in args.multi_request.split(",") if x]:
        for name in args.tasks.split(","):
            cells.append((TASKS.get(name), "multi_request", length, args.turns, args.n))
    for task, mode, length, turns, n in cells:
        cell = run_cell(engine, task, mode, full, n, length, turns, args.seed)
        result["cells"].append(cell)
        save()
        print(f"{cell['task']:22s} {mode:13s} {length:5d} tok  per turn {cell['per_turn']}  mean {cell['mean']}  "
              f"({cell['prompt_tokens_per_turn'][0]}..{cell['prompt_tokens_per_turn'][-1]} prompt tokens, {cell['seconds']}s)",
              flush=True)
    checks = []
    for c in result["cells"]:
        if c["mode"] != "multi_turn":
            continue
        if c["task"] == "probe_passkey":
            checks.append((f"passkey {c['length']}", min(c["per_turn"]) >= 95))
        elif c["length"] <= 4500:
            checks.append((f"{c['task']} {c['length']}", min(c["per_turn"]) >= 90))
        else:
            checks.append((f"{c['task']} {c['length']}", min(c["per_turn"]) >= 80))
    result["targets"] = {k: v for k, v in checks}
    result["targets_met"] = all(v for _, v in checks)
    result["total_s"] = round(time.time() - t0, 1)
    save()
    print("TARGETS", json.dumps(result["targets"]), "ALL MET" if result["targets_met"] else "NOT MET", flush=True)


if __name__ == "__main__":
    main()
