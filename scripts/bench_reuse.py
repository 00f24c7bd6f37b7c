"""What shared-context KV reuse saves: the same examples replayed with reuse and naively (every turn from scratch).

Prints a table and writes results/perf/reuse_<device>.json. Usage:
    python scripts/bench_reuse.py [--length 2000] [--turns 5] [--n 2] [--max-new 32] [--model smollm2-135m]
Both paths produce token-identical greedy outputs for full attention (tests/engines/test_reuse.py); this measures
the prefill tokens each computes and the wall-clock time.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from omegaconf import OmegaConf

from scbench.cli import config_dir
from scbench.data import load_examples
from scbench.run import get_engine
from scbench.records import RunSpec
from scbench.registry import METHODS, TASKS
from scbench.runner import Replay


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="scbench_kv")
    p.add_argument("--length", type=int, default=2000)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    engine = get_engine(OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / f"{a.model}.yaml")))
    task = TASKS.get(a.task)
    count = lambda t: len(engine.encode(t, add_special_tokens=False))  # noqa: E731
    examples = load_examples(task, "generated", n=a.n, length=a.length, turns=a.turns, seed=1234, count=count)
    rows = []
    for mode in ("multi_turn", "multi_request"):
        preds = {}
        for reuse in (True, False):
            spec = RunSpec(model={}, method={"name": "full"}, task=a.task, mode=mode, max_turns=a.turns,
                           max_new_tokens=a.max_new, reuse=reuse)
            t0 = time.perf_counter()
            results = [r for ex in examples for r in Replay(engine, METHODS.get("full")(), task, ex, spec)]
            wall = time.perf_counter() - t0
            preds[reuse] = [r.prediction for r in results]
            rows.append({
                "mode": mode, "path": "reuse" if reuse else "naive", "turns": len(results),
                "prefill_computed": sum(r.stats.prefill_computed for r in results),
                "prefill_reused": sum(r.stats.prefill_reused for r in results),
                "prefill_s": round(sum(r.stats.prefill_s for r in results), 3),
                "mean_ttft_s": round(sum(r.stats.ttft_s for r in results) / len(results), 3),
                "wall_s": round(wall, 2),
            })
        rows[-2]["identical_outputs"] = rows[-1]["identical_outputs"] = preds[True] == preds[False]
    info = engine.describe()
    print(f"model {info['model']} on {info['device_name']} ({info['dtype']}), task {a.task}, "
          f"{a.n} examples x {a.turns} turns, ~{a.length}-token contexts, max_new {a.max_new}")
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    for mode in ("multi_turn", "multi_request"):
        reuse, naive = [r for r in rows if r["mode"] == mode]
        print(f"{mode}: reuse computes {reuse['prefill_computed']} prefill tokens vs {naive['prefill_computed']} naive "
              f"({naive['prefill_computed'] / reuse['prefill_computed']:.2f}x fewer); prefill time {reuse['prefill_s']} s vs "
              f"{naive['prefill_s']} s; wall {reuse['wall_s']} s vs {naive['wall_s']} s")
    out = Path(a.out or f"results/perf/reuse_{'cuda' if info['device'].startswith('cuda') else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"engine": info, "args": vars(a), "machine": platform.platform(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
