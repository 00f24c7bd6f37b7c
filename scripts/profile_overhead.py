"""Where a default CPU run's time goes: the harness's own share (tokenisation, prompt building, scoring, store,
data) against the model's forward passes, under cProfile.

    python scripts/profile_overhead.py                                  # one job of `make run`'s sweep
    python scripts/profile_overhead.py --jobs scbench_kv:multi_turn:full scbench_vt:multi_request:streamingllm-1k
    python scripts/profile_overhead.py --all                            # all 12 jobs of sweep=default

Each job is the spec ``scbench run sweep=default task=T mode=M method=X`` would run, written to a fresh
temporary store (nothing is skipped). The engine is loaded before timing starts (its load time is reported
apart). Every entry point of a category is wrapped by a timer that charges time to the innermost category only
(tokenisation inside prompt building counts as tokenisation), so the categories add up to the wall time; the
run happens under cProfile, which slows Python-heavy code (the harness) more than torch kernels (the model), so
the harness share it reports is an upper bound. Writes a JSON with the categories and the top functions.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import tempfile
import time
from pathlib import Path

SWEEP_JOBS = [f"{t}:{m}:{x}" for t in ("scbench_kv", "scbench_prefix_suffix", "scbench_vt")
              for m in ("multi_turn", "multi_request") for x in ("full", "streamingllm-1k")]
HARNESS = ("tokenisation", "prompt building", "scoring", "store", "data")


class Clock:
    """Exclusive wall time per category: a nested timed call's time is taken off its caller's category."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.stack: list[str] = []

    def wrap(self, owner, name: str, category: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.stack.append(category)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.stack.pop()
                self.seconds[category] = self.seconds.get(category, 0.0) + dt
                if self.stack:
                    self.seconds[self.stack[-1]] = self.seconds.get(self.stack[-1], 0.0) - dt

        setattr(owner, name, timed)


def instrument(clock: Clock, task_classes) -> None:
    from scbench import run as evaluate, prompts
    from scbench.engines import hf
    from scbench.store import Store

    for name in ("encode", "decode", "render_chat"):
        clock.wrap(hf.HFEngine, name, "tokenisation")
    for name in ("__init__", "first", "delta", "request", "context", "max_new"):
        clock.wrap(prompts.PromptBuilder, name, "prompt building")
    for cls in task_classes:
        clock.wrap(cls, "score", "scoring")
    for name in ("__init__", "put", "done_turns", "open_run", "finish_run", "close"):
        clock.wrap(Store, name, "store")
    clock.wrap(evaluate, "load_examples", "data")
    clock.wrap(hf.HFSession, "feed", "model: prefill + compression")
    clock.wrap(hf.HFSession, "generate", "model: decode")


def job_spec(job: str):
    from hydra import compose, initialize_config_dir

    from scbench.cli import config_dir, spec_from_cfg

    task, mode, method = job.split(":")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["sweep=default", f"task={task}", f"mode={mode}", f"method={method}"])
    return spec_from_cfg(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", nargs="+", default=["scbench_kv:multi_turn:full"], help="task:mode:method ...")
    ap.add_argument("--all", action="store_true", help="every job of sweep=default")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("results/perf/decode_overhead_profile_cpu.json"))
    args = ap.parse_args()
    jobs = SWEEP_JOBS if args.all else args.jobs

    from scbench.run import get_engine, run_spec
    from scbench.registry import TASKS

    specs = [job_spec(j) for j in jobs]
    t0 = time.perf_counter()
    engine = get_engine(specs[0].model)
    load_s = time.perf_counter() - t0
    clock = Clock()
    tasks = [TASKS.get(s.task) for s in specs]
    instrument(clock, {t if isinstance(t, type) else type(t) for t in tasks})
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "profile.sqlite")
        t0 = time.perf_counter()
        prof.enable()
        for spec in specs:
            run_spec(spec, store, engine=engine, progress=False)
        prof.disable()
        wall = time.perf_counter() - t0
    cats = dict(sorted(clock.seconds.items(), key=lambda kv: -kv[1]))
    cats["other (runner, torch glue outside the model calls)"] = wall - sum(clock.seconds.values())
    harness = sum(clock.seconds.get(c, 0.0) for c in HARNESS)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
    print(f"{len(jobs)} job(s), wall {wall:.2f} s (engine load {load_s:.2f} s apart)")
    for cat, s in cats.items():
        print(f"  {cat:<52} {s:8.3f} s  {100 * s / wall:6.2f}%")
    print(f"harness (tokenisation + prompt building + scoring + store + data): {harness:.3f} s = "
          f"{100 * harness / wall:.2f}% of the wall time")
    print(text.getvalue())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "jobs": jobs, "wall_s": wall, "engine_load_s": load_s, "categories_s": cats, "harness_s": harness,
        "harness_frac": harness / wall, "under_cprofile": True,
        "top_tottime": text.getvalue().splitlines()[: args.top + 12],
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
