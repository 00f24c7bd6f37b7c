"""Tables, merging and the device-time estimate of scripts/bench_methods.py (``make bench-methods``)."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
SCBENCH_EXAMPLES = 931
"""SCBench's examples (the projection of a whole evaluation from one sweep's steady seconds per example)."""
KEY_KNOBS = ("budget", "bits", "top_k", "tier", "n_local", "vertical_size", "retrieval_ratio")


def short(row: dict) -> str:
    """A table label: the method name and its budget-like knobs (the JSON keeps the full label)."""
    cfg = row.get("config") or {}
    knobs = [f"{k}={cfg[k]}" for k in KEY_KNOBS if k in cfg]
    return f"{cfg.get('name', row.get('method'))}" + (f" ({', '.join(knobs)})" if knobs else "")


def table(rows: list[dict]) -> str:
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
                   f"{r['kv_bytes'] / GIB:.2f} | {r['bytes_per_token'] / GIB:.3f} | {r['peak_mem_bytes'] / GIB:.1f} |")
    return head + "\n".join(out) + "\n"


def derive(data: dict) -> dict:
    """Per context length: each way's sweep totals (parts split by mode add up), examples per GPU-hour, the speed-up
    of grouped + batched over sequential and how many of the sequential sweep's predictions the grouped one shares."""
    agg: dict[tuple, dict] = {}
    for s in data["sweeps"]:
        if s.get("skipped"):
            continue
        a = agg.setdefault((s["length"], s["way"]), {"wall_s": 0.0, "runs_s": 0.0, "warmup_s": 0.0, "cells": 0,
                                                      "runs": 0, "modes": [], "predictions": {}, "failed": [],
                                                      "parts": 0, "rc": 0})
        a["wall_s"] += s["wall_s"]
        a["runs_s"] += s.get("runs_s") or 0.0
        a["warmup_s"] += s.get("warmup_s") or 0.0
        a["cells"] += s["cells"]
        a["runs"] += s["runs"]
        a["modes"] += [m for m in s["modes"] if m not in a["modes"]]
        a["predictions"].update(s.get("predictions") or {})
        a["failed"] += s.get("failed") or []
        a["parts"] += 1
        a["partial"] = a.get("partial", False) or bool(s.get("partial"))
        a["rc"] = max(a["rc"], s.get("rc") or 0)
    summary = []
    for length in sorted({k[0] for k in agg}):
        entry = {"length": length}
        for way in ("sequential", "grouped"):
            a = agg.get((length, way))
            if a is None:
                continue
            entry[way] = {k: a.get(k) for k in ("wall_s", "runs_s", "warmup_s", "cells", "runs", "modes", "failed",
                                                "parts", "rc", "partial")}
            entry[way]["steady_s"] = a["runs_s"] - a["warmup_s"]
            entry[way]["examples_per_gpu_hour"] = a["cells"] * 3600 / a["wall_s"] if a["wall_s"] else None
            entry[way]["examples_per_gpu_hour_steady"] = (a["cells"] * 3600 / entry[way]["steady_s"]
                                                          if entry[way]["steady_s"] > 0 else None)
        seq, grp = agg.get((length, "sequential")), agg.get((length, "grouped"))
        if seq and grp:
            # a sweep stopped at its deadline: the ratio of examples per GPU-hour (flagged partial) instead
            entry["partial"] = bool(seq.get("partial") or grp.get("partial"))
            entry["speedup"] = (seq["wall_s"] / grp["wall_s"] if not entry["partial"] else
                                (grp["cells"] / grp["wall_s"]) / (seq["cells"] / seq["wall_s"]) if seq["cells"] else None)
            steady = entry["sequential"]["steady_s"], entry["grouped"]["steady_s"]
            entry["speedup_steady"] = (steady[0] / steady[1] if steady[1] > 0 else None) if not entry["partial"] else (
                (grp["cells"] / steady[1]) / (seq["cells"] / steady[0]) if steady[0] > 0 and steady[1] > 0 and seq["cells"]
                else None)
            entry["same_cells"] = seq["cells"] == grp["cells"] and seq["modes"] == grp["modes"]
            per = max(1, int(data.get("examples") or 1))  # examples per (method, mode) cell
            entry["projection"] = {
                "examples": SCBENCH_EXAMPLES, "methods_x_modes": entry["sequential"]["runs"],
                **{f"gpu_hours_{w}": SCBENCH_EXAMPLES * entry[w]["steady_s"] / per / 3600 for w in ("sequential", "grouped")}}
            ref = seq["predictions"]
            same = sum(grp["predictions"].get(k) == v for k, v in ref.items())
            entry["same_predictions"] = f"{same}/{len(ref)}"
        summary.append(entry)
    return {**data, "summary": summary}


def projection_lines(summary: list[dict]) -> str:
    out = []
    for e in summary:
        p = e.get("projection")
        if p:
            h = lambda x: f"{x:.0f}" if x >= 10 else f"{x:.2g}"  # noqa: E731
            out.append(f"- {e['length']} tokens: SCBench's {p['examples']} examples x these {p['methods_x_modes']} "
                       f"(method, mode) runs: {h(p['gpu_hours_sequential'])} GPU-hours sequentially, "
                       f"{h(p['gpu_hours_grouped'])} grouped + batched (steady seconds per example x "
                       f"{p['examples']}; this sweep's turns and generation lengths)")
    return "\n".join(out) + ("\n" if out else "")


def sweep_table(summary: list[dict]) -> str:
    head = ("| context | modes | examples | sequential s | grouped + batched s | sequential examples/GPU-h | "
            "grouped examples/GPU-h | speed-up | steady s (seq / grouped) | steady speed-up | same predictions |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    out = []
    f = lambda e, w, k, fmt: format(e[w][k], fmt) if w in e and e[w].get(k) is not None else "-"  # noqa: E731
    for e in summary:
        modes = (e.get("sequential") or e.get("grouped"))["modes"]
        cells = "/".join(str(e[w]["cells"]) for w in ("sequential", "grouped") if w in e)
        sp = (f"{e['speedup']:.2f}x" + (" (partial: throughput ratio)" if e.get("partial") else "")
              if e.get("speedup") else "-")
        out.append(f"| {e['length']} | {'+'.join(modes)} | {cells} | {f(e, 'sequential', 'wall_s', '.0f')} | "
                   f"{f(e, 'grouped', 'wall_s', '.0f')} | {f(e, 'sequential', 'examples_per_gpu_hour', ',.0f')} | "
                   f"{f(e, 'grouped', 'examples_per_gpu_hour', ',.0f')} | {sp} | {f(e, 'sequential', 'steady_s', '.0f')}"
                   f" / {f(e, 'grouped', 'steady_s', '.0f')} | "
                   + (f"{e['speedup_steady']:.2f}x" if e.get("speedup_steady") else "-")
                   + f" | {e.get('same_predictions', '-')} |")
    return head + "\n".join(out) + "\n"


def write(out: Path, data: dict) -> None:
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    rows = sorted([r for r in data["rows"] if r.get("way", "sequential") == "sequential"],
                  key=lambda r: (r["length"], r["mode"]))
    md = (f"# Methods on {data['device']} (torch {data['torch']}, commit {data['commit']})\n\n"
          f"`scripts/bench_methods.py`: `scbench run` on {' '.join(data['model'])}, scbench_kv, generated data, "
          f"{data.get('examples', 1)} example(s), {data['turns']} turns of at most {data['max_new_tokens']} new "
          "tokens, both modes.\n\n## Sweep wall time\n\nThe same sweep (every method below x the modes) run one job "
          "at a time (`share_prefill=false timing=sequential`) and grouped + batched (`share_prefill=true "
          "timing=batched`), each one `scbench run -m` process (model build included); an example is one (method, "
          "mode, example) cell with all its turns; steady: from the first run's start to the last turn stored, "
          "less every run's warm-up (no process start, model build or one-time compilation: what a sweep of many "
          "examples pays per example); same predictions: turns of the grouped sweep equal to the sequential "
          "one's.\n\n" + sweep_table(data.get("summary") or []) + "\n" + projection_lines(data.get("summary") or []) +
          "\n## Per method (the sequential sweep: one request at a time)\n\ndecode tok/s is the median over turns; "
          "vs full: decode rate over full attention's in the same (context, mode).\n\n" + table(rows))
    out.with_suffix(".md").write_text(md)
    print(md)


def combine(files: list[str], out: Path) -> None:
    parts = [json.loads(Path(f).read_text()) for f in files]
    data = {**parts[0], "rows": [r for p in parts for r in p["rows"]],
            "sweeps": [s for p in parts for s in p.get("sweeps", [])],
            "commit": ",".join(dict.fromkeys(p["commit"] for p in parts)),
            "estimate_s": sum(p.get("estimate_s") or 0 for p in parts)}
    write(out, derive(data))


# --- the device-time estimate ---------------------------------------------------------------------------------
GUESS = {"kvzip": (2.5, 30.0), "adakv": (1.0, 30.0), "duo_attention": (1.0, 30.0)}
"""Methods missing from the measured file: (first prefill as a multiple of full attention's, decode tok/s: the
plain decode loop of a ragged cache)."""
PROCESS_S = 20.0
"""Per sweep process: imports, CUDA start, building the random 8B model in memory."""


def _run_overhead(length: int) -> float:
    """Per run: data generation, prompt tokenisation, store writes (fit to methods_gpu.json's 11-run sweeps)."""
    return 0.4 + 1.2 * length / 131000


def estimate(measured: Path, methods: list[str], lengths: list[int], modes: list[str], ways: list[str], turns: int,
             max_new: int, examples: int) -> dict:
    """Device seconds of each (length, way) sweep from a measured methods_gpu.json (per-method prefill, later prefill,
    warm-up, decode rate of the nearest length, prefill scaled by (length ratio)^1.5); methods it lacks use
    ``GUESS``. Grouped: one dense prefill per (mode, example) for the methods that share it plus their own extra
    prefill work, the others alone; batchable turns decode in one batch (~1.15x one turn's time)."""
    from omegaconf import OmegaConf

    from scbench.batch import fallback_reason
    from scbench.group import can_share
    from scbench.records import RunSpec
    from scbench.run import build_method

    if not measured.is_file():
        return {"text": f"no estimate: {measured} missing", "total_s": None, "sweeps": {}}
    old = [r for r in json.loads(measured.read_text())["rows"]
           if "prefill_s" in r and r.get("way", "sequential") == "sequential"]

    def lookup(label: str, length: int) -> dict | None:
        cands = [r for r in old if short(r) == label]
        if not cands:
            return None
        r = min(cands, key=lambda r: abs(r["length"] - length))
        scale = (length / r["length"]) ** 1.5
        return {"prefill": r["prefill_s"] * scale, "later": r["later_prefill_s"] or 0.0, "warm": r["warmup_s"],
                "rate": r["decode_tok_s"] or 30.0}

    engine = type("E", (), {"offload": None, "name": "hf"})()
    sweeps, lines, total = {}, [], 0.0
    for length in lengths:
        full = lookup("full", length) or {"prefill": 12.0 * (length / 131000) ** 1.5, "later": 0.2, "warm": 3.0,
                                          "rate": 85.0}
        cost = {}
        for name in methods:
            f = ROOT / "configs" / "method" / f"{name.removesuffix('-random')}.yaml"
            cfg = OmegaConf.to_container(OmegaConf.load(f)) if f.is_file() else {"name": name}
            method = build_method(cfg)
            c = lookup(short({"config": cfg}), length)
            guessed = c is None
            if c is None:
                mult, rate = GUESS.get(cfg["name"], (1.0, full["rate"]))
                c = {"prefill": full["prefill"] * mult, "later": full["later"], "warm": 1.0, "rate": rate}
            batch = {m: fallback_reason(engine, method, RunSpec(model={}, method={}, task="scbench_kv", mode=m),
                                        check_engine=False) is None for m in modes}
            cost[name] = {**c, "share": can_share(type(method)), "batch": batch, "guessed": guessed}
        step = (max_new - 1)
        warm = sum(c["warm"] for c in cost.values())  # once per method label per process
        rest = lambda c: (turns - 1) * c["later"] + _run_overhead(length)  # noqa: E731
        seq = PROCESS_S + warm + examples * sum(c["prefill"] + rest(c) + turns * step / c["rate"]
                                                for c in cost.values() for _ in modes)
        grp = PROCESS_S + warm
        for mode in modes:
            shared = [c for c in cost.values() if c["share"]]
            grp += examples * ((full["prefill"] if shared else 0.0)
                               + sum(max(0.0, c["prefill"] - full["prefill"]) for c in shared)
                               + sum(c["prefill"] for c in cost.values() if not c["share"])
                               + sum(rest(c) + (1.15 * step / c["rate"] if c["batch"][mode] and turns > 1
                                                else turns * step / c["rate"]) for c in cost.values()))
        for way, s in (("sequential", seq), ("grouped", grp)):
            if way in ways:
                sweeps[f"{length}-{way}"] = s
                total += s
                lines.append(f"  {length} {way}: ~{s:.0f} s")
        guessed = [n for n, c in cost.items() if c["guessed"]]
        if guessed:
            lines.append(f"  ({length}: no measurement for {', '.join(guessed)}; guessed from full attention)")
    text = (f"estimate from {measured.name} ({len(methods)} methods x {len(modes)} modes x {examples} example(s), "
            f"{turns} turns of {max_new} tokens): ~{total:.0f} s of device time\n" + "\n".join(lines))
    return {"text": text, "total_s": total, "sweeps": sweeps}
