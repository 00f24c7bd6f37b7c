"""Tables, merging and the device-time estimate of scripts/bench_methods.py (``make bench-methods``)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
SCBENCH_EXAMPLES = 931
"""SCBench's examples (the projection of a whole evaluation from one sweep's steady seconds per example)."""
KEY_KNOBS = ("budget", "bits", "decode_cache", "top_k", "tier", "n_local", "vertical_size", "retrieval_ratio")


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
            out.append(f"| {context(r)} | {r['mode']} | {short(r)} | failed: {r.get('error', r['status'])} "
                       "| | | | | | | | |")
            continue
        lp = f"{r['later_prefill_s']:.3f}" if r["later_prefill_s"] is not None else "-"
        fb = f" (prefill: {r['prefill_fallbacks']} dense-fallback layers)" if r.get("prefill_fallbacks") else ""
        rest = (r.get("first_prefill_s_all") or [])[1:]  # later examples' first prefill: median in brackets
        pf = f"{r['prefill_s']:.2f}" + (f" ({statistics.median(rest):.2f})" if rest else "")
        out.append(f"| {context(r)} | {r['mode']} | {short(r)} | {pf} | {lp} | {r['warmup_s']:.1f} | "
                   f"{r['decode_tok_s']:.1f} | {r.get('decode_vs_full', 0):.2f} | {r['decode_path']}{fb} | "
                   f"{r['kv_bytes'] / GIB:.2f} | {r['bytes_per_token'] / GIB:.3f} | {r['peak_mem_bytes'] / GIB:.1f} |")
    return head + "\n".join(out) + "\n"


WAYS = ("sequential", "grouped", "grouped_sequential", "grouped_per_run")
LABEL = {"sequential": "sequential", "grouped": "grouped + batched", "grouped_sequential": "grouped",
         "grouped_per_run": "grouped + batched per run"}


def derive(data: dict) -> dict:
    """Per context length: each way's sweep totals (parts split by mode add up), examples per GPU-hour (wall and
    steady), each way's speed-up over sequential, how many of the sequential sweep's predictions each shares, and
    the projection of SCBench's 931 examples (``projection``)."""
    agg: dict[tuple, dict] = {}
    for s in data["sweeps"]:
        if s.get("skipped"):
            continue
        a = agg.setdefault((s["length"], extra_of(s), s["way"]), {
            "wall_s": 0.0, "runs_s": 0.0, "warmup_s": 0.0, "cells": 0, "runs": 0, "modes": [], "predictions": {},
            "failed": [], "parts": 0, "rc": 0})
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
    for length, extra in sorted({k[:2] for k in agg}):  # sweeps under other overrides (--extra): their own entry
        entry = {"length": length, "extra": extra}
        for way in WAYS:
            a = agg.get((length, extra, way))
            if a is None:
                continue
            e = entry[way] = {k: a.get(k) for k in ("wall_s", "runs_s", "warmup_s", "cells", "runs", "modes",
                                                   "failed", "parts", "rc", "partial")}
            e["steady_s"] = a["runs_s"] - a["warmup_s"]
            e["examples_per_gpu_hour"] = a["cells"] * 3600 / a["wall_s"] if a["wall_s"] else None
            e["examples_per_gpu_hour_steady"] = a["cells"] * 3600 / e["steady_s"] if e["steady_s"] > 0 else None
            e["steady_s_per_example"] = e["steady_s"] / a["cells"] if a["cells"] else None
            runs = [r.get("decode_runs") for r in data["rows"] if r.get("length") == length and r.get("way") == way
                    and extra_of(r) == extra]
            e["decode_runs"] = max((n for n in runs if n), default=None)  # most runs one decode batch held
        seq = agg.get((length, extra, "sequential"))
        for way in WAYS[1:]:
            grp = agg.get((length, extra, way))
            if not (seq and grp):
                continue
            # a sweep stopped at its deadline: the ratio of examples per GPU-hour (flagged partial) instead
            partial = bool(seq.get("partial") or grp.get("partial"))
            steady = entry["sequential"]["steady_s"], entry[way]["steady_s"]
            wall = (seq["wall_s"] / grp["wall_s"] if not partial else
                    (grp["cells"] / grp["wall_s"]) / (seq["cells"] / seq["wall_s"]) if seq["cells"] else None)
            stdy = (steady[0] / steady[1] if steady[1] > 0 else None) if not partial else (
                (grp["cells"] / steady[1]) / (seq["cells"] / steady[0]) if steady[0] > 0 and steady[1] > 0 and seq["cells"]
                else None)
            same = sum(grp["predictions"].get(k) == v for k, v in seq["predictions"].items())
            if way == "grouped":  # the keys of earlier JSON files
                entry.update(partial=partial, speedup=wall, speedup_steady=stdy,
                             same_cells=seq["cells"] == grp["cells"] and seq["modes"] == grp["modes"],
                             same_predictions=f"{same}/{len(seq['predictions'])}")
            entry[way].update(speedup=wall, speedup_steady=stdy, same_predictions=f"{same}/{len(seq['predictions'])}")
        if seq and agg.get((length, extra, "grouped")) and not agg.get((length, extra, "grouped_sequential")):
            derived = grouped_alone(data, entry, length)
            if derived:
                entry["grouped_sequential_derived"] = derived
        if seq and entry.get("grouped"):
            entry["projection"] = project(data, entry)
        summary.append(entry)
    return {**data, "summary": summary}


def grouped_alone(data: dict, entry: dict, length: int) -> dict | None:
    """Grouped execution with one-request-at-a-time decoding, derived where it was not run: the grouped + batched
    sweep's steady seconds less its turns' decode seconds (a batched turn's ``decode_s`` is its share of the batch)
    plus the sequential sweep's decode seconds (the same decode path, one request at a time). None without the
    per-run decode sums (older JSON) or when the two sweeps did not finish the same cells."""
    rows = {w: [r for r in data["rows"] if r["length"] == length and r.get("way") == w and "prefill_s" in r
                and extra_of(r) == entry["extra"]]
            for w in ("sequential", "grouped")}
    if not all(rows.values()) or any(r.get("decode_s_sum") is None for w in rows.values() for r in w) or \
            entry["sequential"]["cells"] != entry["grouped"]["cells"] or entry["sequential"].get("partial"):
        return None
    dec = {w: sum(r["decode_s_sum"] for r in rs) for w, rs in rows.items()}
    steady = entry["grouped"]["steady_s"] - dec["grouped"] + dec["sequential"]
    cells = entry["grouped"]["cells"]
    return {"steady_s": steady, "steady_s_per_example": steady / cells, "decode_s_batched": dec["grouped"],
            "decode_s_sequential": dec["sequential"], "examples_per_gpu_hour_steady": cells * 3600 / steady,
            "speedup_steady": entry["sequential"]["steady_s"] / steady, "modes": entry["grouped"]["modes"],
            "cells": cells, "derived": True}


def project(data: dict, entry: dict) -> dict:
    """SCBench's 931 examples: GPU-hours of the measured (method, mode) runs at the sweep's steady seconds per example
    cell, and of every method config (``all_methods``, default 14) x 2 modes at the same mean seconds per cell (the
    measured methods standing for all of them: exact when the sweep ran all 14 x 2)."""
    seq = entry["sequential"]
    methods_x_modes = seq["runs"] // max(1, len(data.get("tasks") or [1]))
    every = int(data.get("all_methods") or 14) * 2
    out = {"examples": SCBENCH_EXAMPLES, "methods_x_modes": methods_x_modes, "all_methods_x_modes": every,
           "turns": data.get("turns"), "max_new_tokens": data.get("max_new_tokens")}
    for w in WAYS:
        per = (entry.get(w) or entry.get(f"{w}_derived") or {}).get("steady_s_per_example")
        if per is None:
            continue
        out[f"gpu_hours_{w}"] = SCBENCH_EXAMPLES * methods_x_modes * per / 3600
        out[f"gpu_hours_all_{w}"] = SCBENCH_EXAMPLES * every * per / 3600
    return out


def extra_of(d: dict) -> str:
    """A sweep's, row's or summary entry's ``--extra`` overrides ("" where none, or in JSON from before they were
    recorded)."""
    return d.get("extra") or ""


def context(entry: dict) -> str:
    """The context cell of a table: the length, and the sweep's extra overrides where it had any."""
    return f"{entry['length']}" + (f" ({extra_of(entry)})" if extra_of(entry) else "")


def projection_lines(summary: list[dict]) -> str:
    out = []
    h = lambda x: f"{x:,.0f}" if x >= 10 else f"{x:.2g}"  # noqa: E731
    for e in summary:
        p = e.get("projection")
        if not p:
            continue
        ways = [w for w in WAYS if f"gpu_hours_{w}" in p]  # grouped alone: measured or derived (sweep table)
        these = ", ".join(f"{h(p[f'gpu_hours_{w}'])} {LABEL[w]}" for w in ways)
        every = ", ".join(f"{h(p[f'gpu_hours_all_{w}'])} {LABEL[w]}" for w in ways)
        out.append(f"- {context(e)} tokens ({p.get('turns')} turns of at most {p.get('max_new_tokens')} new tokens): "
                   f"SCBench's {p['examples']} examples x these {p['methods_x_modes']} (method, mode) runs: {these} "
                   f"GPU-hours; x all {p['all_methods_x_modes']} (every method config x 2 modes, at this sweep's mean "
                   f"steady seconds per example): {every} GPU-hours")
    return "\n".join(out) + ("\n" if out else "")


def sweep_table(summary: list[dict]) -> str:
    head = ("| context | modes | way | examples | wall s | examples/GPU-h | speed-up | steady s | steady s / example | "
            "steady speed-up | same predictions | runs per decode |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    out = []
    f = lambda d, k, fmt: format(d[k], fmt) if d.get(k) is not None else "-"  # noqa: E731
    for e in summary:
        for w in WAYS:
            d = e.get(w)
            if d is None and e.get(f"{w}_derived"):  # steady figures only: derived, not run
                d = e[f"{w}_derived"]
                out.append(f"| {context(e)} | {'+'.join(d['modes'])} | {LABEL[w]} (derived: grouped + batched less "
                           f"its decode, plus the sequential decode) | {d['cells']} | - | - | - | {d['steady_s']:.0f} | "
                           f"{d['steady_s_per_example']:.1f} | {d['speedup_steady']:.2f}x | - | - |")
                continue
            if d is None:
                continue
            sp = f"{d['speedup']:.2f}x" + (" (partial)" if e.get("partial") else "") if d.get("speedup") else "-"
            out.append(f"| {context(e)} | {'+'.join(d['modes'])} | {LABEL[w]} | {d['cells']} | {f(d, 'wall_s', '.0f')} | "
                       f"{f(d, 'examples_per_gpu_hour', ',.0f')} | {sp} | {f(d, 'steady_s', '.0f')} | "
                       f"{f(d, 'steady_s_per_example', '.1f')} | "
                       + (f"{d['speedup_steady']:.2f}x" if d.get("speedup_steady") else "-")
                       + f" | {d.get('same_predictions', '-')} | {d.get('decode_runs') or '-'} |")
    return head + "\n".join(out) + "\n"


def write(out: Path, data: dict) -> None:
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
    rows = sorted([r for r in data["rows"] if r.get("way", "sequential") == "sequential"],
                  key=lambda r: (r["length"], extra_of(r), r["mode"]))
    md = (f"# Methods on {data['device']} (torch {data['torch']}, commit {data['commit']})\n\n"
          f"`scripts/bench_methods.py`: `scbench run` on {' '.join(data['model'])}, {data.get('task', 'scbench_kv')}, "
          f"generated data, {data.get('examples', 1)} example(s) per task, {data['turns']} turns of at most "
          f"{data['max_new_tokens']} new tokens.\n\n## Sweep wall time\n\nThe same sweep (every method below x "
          "the modes) run one job at a time (`share_prefill=false timing=sequential`), grouped + batched "
          "(`share_prefill=true timing=batched`) and, where measured, grouped alone (`share_prefill=true "
          "timing=sequential`), each one `scbench run -m` process (model build included); an example is one "
          "(method, mode, task, example) cell with all its turns; steady: from the first run's start to the last "
          "turn stored, less every run's warm-up on its first example (no process start, model build or one-time "
          "compilation: what a sweep of many examples pays per example; a later example's warm-ups, such as graph "
          "captures that recur per example, stay in); speed-ups are over the sequential sweep; same predictions: "
          "turns equal to the sequential sweep's; runs per decode: the most runs one decode batch held "
          "(`decode_runs`; - where not recorded).\n\n" + sweep_table(data.get("summary") or []) + "\n" + projection_lines(data.get("summary") or []) +
          retry_lines(data["rows"]) +
          "\n## Per method (the sequential sweep: one request at a time)\n\ndecode tok/s is the median over turns; "
          "vs full: decode rate over full attention's in the same (context, mode); prefill s: the first example's first "
          "turn, in brackets the median of the later examples' first turns where the run had more than one.\n\n" + table(rows))
    out.with_suffix(".md").write_text(md)
    print(md)


def retry_lines(rows: list[dict]) -> str:
    """A line per (context, way) whose runs redid work (``retry_s``: an out-of-memory preparation prepared again
    alone, a failed combined decode redone run by run): inside the sweep's wall and steady seconds, in no turn's.
    A run of a grouped sweep that then prefilled by itself (``prefill_shared`` 1) has that first prefill in its own
    ``prefill_s``: the line names those seconds too (work sharing would have saved)."""
    lost: dict = {}
    for r in rows:
        if r.get("retry_s"):
            key = (context(r), LABEL.get(r.get("way"), r.get("way")))
            n, s, alone = lost.get(key, (0, 0.0, []))
            if r.get("way", "sequential") != "sequential" and r.get("prefill_shared") == 1 and r.get("prefill_s"):
                alone = alone + [r["prefill_s"]]
            lost[key] = (n + 1, s + r["retry_s"], alone)
    return "".join(f"- {length} tokens, {way}: {n} run(s) redid work after a failed attempt, {s:.1f} s in all "
                   "(`retry_s`; counted in the sweep's seconds, in no turn's prefill or decode)"
                   + (f"; {len(alone)} of them then prefilled by themselves ({sum(alone):.1f} s of first prefill, "
                      "compression included, in their own `prefill_s` with `prefill_shared` 1)" if alone else "")
                   + "\n"
                   for (length, way), (n, s, alone) in sorted(lost.items()))


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


BATCH_STEP = 1.15
"""A run's batch of turns decodes in about this many times one turn's decode (a step of its rows ~ one row's)."""
WEIGHT_SHARE = 0.7
"""The share of the fastest run's step that is reading the weights, which a combined batch reads once for every run
(fit to methods_gpu.json at d4c7442, 32K: 14 runs per decode took 2.1 s per mode, ~3.4 ms of weights per step)."""


def together_step(steps: list[float]) -> float:
    """Seconds of one step of several runs' batches decoded as one, from each run's step alone: the weights are read
    once (``WEIGHT_SHARE`` of the fastest run's step), each run's cache and own work stay its own."""
    return sum(steps) - (len(steps) - 1) * WEIGHT_SHARE * min(steps) if steps else 0.0


def _run_overhead(length: int) -> float:
    """Per run: data generation, prompt tokenisation, store writes (fit to methods_gpu.json's 11-run sweeps)."""
    return 0.4 + 1.2 * length / 131000


WINDOW = 131072
"""The 8B presets' context window (``max_position_embeddings``): where SCBench's truncation starts."""


def modes_share(extra: list[str], length: int, turns: int, max_new: int) -> bool:
    """Whether a grouped sweep's two modes feed one first prefill (``group_example.prefill_classes``): the query
    hidden (``policy.query_visible=false``) and the first prompts equal, i.e. ``policy.truncation=context`` or no
    truncation (context + the turns' generation budget + multi-request's margin inside the window)."""
    from scbench.prompts import MULTI_REQUEST_MARGIN

    if "policy.query_visible=false" not in extra:
        return False
    return "policy.truncation=context" in extra or length + turns * max_new + MULTI_REQUEST_MARGIN < WINDOW


def estimate(measured: Path, methods: list[str], lengths: list[int], modes: list[str], ways: list[str], turns: int,
             max_new: int, examples: int, extra: list[str] = ()) -> dict:
    """Device seconds of each (length, way) sweep from a measured methods_gpu.json (per-method prefill, later prefill,
    warm-up, decode rate of the nearest length, prefill scaled by (length ratio)^1.5); methods it lacks use
    ``GUESS``. Grouped: one dense prefill per (mode, example) for the methods that share it plus their own extra
    prefill work, the others alone; when the modes share a prefill (``modes_share``, from ``extra``: the sweep's
    overrides) that prefill, a shared score's pass (``score_key``: H2O, KVzip) and each sparse-prefill method's own
    prefill count once per example, not per mode; a run's batchable turns decode in one batch (~1.15x one turn's
    time) and, in the grouped + batched sweep, the runs' batches as one (``together_step``: memory may split them
    at 131K)."""
    from omegaconf import OmegaConf

    from scbench.batch import fallback_reason
    from scbench.group import can_share
    from scbench.group_example import sparse_prefill
    from scbench.records import RunSpec
    from scbench.run import build_method

    if not measured.is_file():
        return {"text": f"no estimate: {measured} missing", "total_s": None, "sweeps": {}}
    rows = [r for r in json.loads(measured.read_text())["rows"] if "prefill_s" in r]
    old = [r for r in rows if r.get("way", "sequential") == "sequential"]
    grouped = [r for r in rows if r.get("way") == "grouped"]

    def lookup(label: str, length: int) -> dict | None:
        cands = [r for r in old if short(r) == label]
        if not cands:
            return None
        r = min(cands, key=lambda r: abs(r["length"] - length))
        scale = (length / r["length"]) ** 1.5
        g = [x for x in grouped if short(x) == label]  # a grouped process warms up less (one shared warm-up forward)
        warm_g = min(g, key=lambda x: abs(x["length"] - length))["warmup_s"] if g else r["warmup_s"]
        return {"prefill": r["prefill_s"] * scale, "later": r["later_prefill_s"] or 0.0, "warm": r["warmup_s"],
                "warm_grouped": warm_g, "rate": r["decode_tok_s"] or 30.0}

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
            hooks = type(method).hooks()
            cost[name] = {**c, "share": can_share(type(method)), "batch": batch, "guessed": guessed,
                          "scored": "compress_cache" in hooks and method.score_key() is not None,
                          "own": not can_share(type(method)) and sparse_prefill(type(method))}
        step = (max_new - 1)
        warm = sum(c["warm"] for c in cost.values())  # once per method label per process
        rest = lambda c: (turns - 1) * c["later"] + _run_overhead(length)  # noqa: E731
        seq = PROCESS_S + warm + examples * sum(c["prefill"] + rest(c) + turns * step / c["rate"]
                                                for c in cost.values() for _ in modes)
        warm_g = sum(c.get("warm_grouped", c["warm"]) for c in cost.values())
        # grouped: "together" (the runs' batches decoded as one), "apart" (each run's batch alone), "sequential"
        grp = dict.fromkeys(("together", "apart", "sequential"), PROCESS_S + warm_g)
        cross = len(modes) > 1 and modes_share(list(extra), length, turns, max_new)
        for k, mode in enumerate(modes):
            shared = [c for c in cost.values() if c["share"]]
            again = cross and k > 0  # the first mode's prefill, shared scores and sparse prefills serve this one
            prefill = ((full["prefill"] if shared and not again else 0.0)
                       + sum(max(0.0, c["prefill"] - full["prefill"]) for c in shared if not (again and c["scored"]))
                       + sum(c["prefill"] for c in cost.values() if not c["share"] and not (again and c["own"])))
            batch = [c for c in cost.values() if c["batch"][mode] and turns > 1]
            unbatched = sum(turns * step / c["rate"] for c in cost.values() if c not in batch)
            decode = {"sequential": unbatched + sum(turns * step / c["rate"] for c in batch),
                      "apart": unbatched + sum(BATCH_STEP * step / c["rate"] for c in batch),
                      "together": unbatched + BATCH_STEP * step * together_step([1 / c["rate"] for c in batch])}
            for way in grp:
                grp[way] += examples * (prefill + decode[way] + sum(rest(c) for c in cost.values()))
        for way, s in (("sequential", seq), ("grouped", grp["together"]), ("grouped_sequential", grp["sequential"]),
                       ("grouped_per_run", grp["apart"])):
            if way in ways:
                sweeps[f"{length}-{way}"] = s
                total += s
                lines.append(f"  {length} {way}: ~{s:.0f} s")
        if cross:
            lines.append(f"  ({length}: the modes share one prefill)")
        guessed = [n for n, c in cost.items() if c["guessed"]]
        if guessed:
            lines.append(f"  ({length}: no measurement for {', '.join(guessed)}; guessed from full attention)")
    text = (f"estimate from {measured.name} ({len(methods)} methods x {len(modes)} modes x {examples} example(s), "
            f"{turns} turns of {max_new} tokens): ~{total:.0f} s of device time\n" + "\n".join(lines))
    return {"text": text, "total_s": total, "sweeps": sweeps}
