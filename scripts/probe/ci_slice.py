"""The small slice of the benchmark that the CI regression test re-runs with the probe model (CPU).

    python scripts/probe/ci_slice.py --write results/reference/probe_ci_slice.json   # regenerate the reference

scbench_kv, generated rows at ~1K context tokens (seed 0: an evaluation seed, never a training seed),
2 examples x 3 turns, multi-turn mode, full attention and StreamingLLM (method/streamingllm-1k: 32 sinks + 224
local tokens), through scbench.runner.Replay. Scores are per-turn means x 100.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROBE = {"name": "smollm2-135m-probe", "path": "embedded:smollm2", "adapter": "models/smollm2-135m-probe",
         "device": "cpu", "dtype": "float32", "window": 8192}
SLICE = {"task": "scbench_kv", "mode": "multi_turn", "n": 2, "length": 1000, "turns": 3, "seed": 0, "max_new_tokens": 40}
METHODS = {"full": {"name": "full"}, "streamingllm-1k": {"name": "streamingllm", "n_init": 32, "n_local": 224}}
TOLERANCE = 25.0
"""Allowed change of any per-turn score (points of 100). With 2 examples a cell moves in steps of 50, so any
flipped answer fails the test; the tolerance only absorbs nothing-changed float noise."""


def run_slice(engine) -> dict:
    from scbench.data import load_examples
    from scbench.evaluate import build_method
    from scbench.records import RunSpec
    from scbench.registry import TASKS
    from scbench.runner import Replay

    task = TASKS.get(SLICE["task"])
    count = lambda t: len(engine.encode(t, add_special_tokens=False))  # noqa: E731
    examples = load_examples(task, "generated", n=SLICE["n"], length=SLICE["length"], turns=SLICE["turns"],
                             seed=SLICE["seed"], count=count)
    out = {}
    for label, cfg in METHODS.items():
        spec = RunSpec(model={}, method=dict(cfg), task=task.name, mode=SLICE["mode"], max_turns=SLICE["turns"],
                       max_seq_length=engine.window, max_new_tokens=SLICE["max_new_tokens"])
        per_turn: dict[int, list[float]] = {}
        preds = []
        for ex in examples:
            for r in Replay(engine, build_method(cfg), task, ex, spec):
                per_turn.setdefault(r.turn, []).append(r.scores[task.metric])
                preds.append(r.prediction)
        out[label] = {"per_turn": [round(100 * sum(v) / len(v), 1) for _, v in sorted(per_turn.items())],
                      "predictions": preds}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", help="write the reference JSON here")
    args = ap.parse_args()
    from scbench.evaluate import get_engine

    engine = get_engine(dict(PROBE))
    result = {"model": PROBE, "slice": SLICE, "tolerance": TOLERANCE, "scores": run_slice(engine),
              "adapter_sha256": engine.describe().get("adapter_sha256")}
    text = json.dumps(result, indent=1) + "\n"
    if args.write:
        Path(args.write).write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
