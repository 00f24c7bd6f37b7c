"""scripts/bench_methods.py (`make bench-methods`): the sequential and grouped + batched sweeps through `scbench run`
end to end on the tiny model, parts merged by length or mode, and the device-time estimate."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import ROOT, load_script

report = load_script("bench_methods_report.py")
bench = load_script("bench_methods.py")


def sweep(way, mode, wall, preds, length=100):
    return {"length": length, "way": way, "modes": [mode], "rc": 0, "wall_s": wall, "runs_s": wall - 2,
            "warmup_s": 1.0, "runs": 2, "cells": 2, "failed": [], "predictions": preds}


def part(mode, seq_wall, grp_wall, same=True):
    preds = {f"full|{mode}|0|{t}": f"answer {t}" for t in range(2)}
    other = preds if same else {k: v + "!" for k, v in preds.items()}
    return {"device": "cpu", "torch": "x", "commit": mode, "model": ["model=tiny"], "turns": 2, "max_new_tokens": 4,
            "rows": [], "sweeps": [sweep("sequential", mode, seq_wall, preds), sweep("grouped", mode, grp_wall, other)]}


def test_parts_split_by_mode_add_up(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(part("multi_turn", 30.0, 10.0)))
    b.write_text(json.dumps(part("multi_request", 50.0, 20.0, same=False)))
    report.combine([str(a), str(b)], tmp_path / "m")
    data = json.loads((tmp_path / "m.json").read_text())
    (e,) = data["summary"]
    assert e["sequential"]["wall_s"] == 80.0 and e["grouped"]["wall_s"] == 30.0 and e["speedup"] == 80.0 / 30.0
    assert e["sequential"]["modes"] == ["multi_turn", "multi_request"] and e["sequential"]["cells"] == 4
    assert e["grouped"]["steady_s"] == 30.0 - 4 - 2 and e["same_predictions"] == "2/4"
    assert e["grouped"]["examples_per_gpu_hour"] == 4 * 3600 / 30.0
    md = (tmp_path / "m.md").read_text()
    assert "## Sweep wall time" in md and "| 100 | multi_turn+multi_request | grouped + batched | 4 | 30 |" in md


def test_sweeps_under_other_overrides_are_their_own_entry(tmp_path):
    """A sweep run with --extra (e.g. policy.truncation=context) is compared only with sweeps under the same overrides:
    same length, own entry, the overrides named in the table."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(part("multi_turn", 30.0, 10.0)))
    variant = part("multi_turn", 40.0, 8.0)
    for s in variant["sweeps"]:
        s["extra"] = "policy.truncation=context"
    b.write_text(json.dumps(variant))
    report.combine([str(a), str(b)], tmp_path / "m")
    plain, ctx = json.loads((tmp_path / "m.json").read_text())["summary"]
    assert (plain["extra"], plain["speedup"]) == ("", 3.0)
    assert (ctx["extra"], ctx["speedup"], ctx["sequential"]["cells"]) == ("policy.truncation=context", 5.0, 2)
    md = (tmp_path / "m.md").read_text()
    assert "| 100 (policy.truncation=context) | multi_turn | grouped + batched | 2 | 8 |" in md
    assert "| 100 | multi_turn | grouped + batched | 2 | 10 |" in md


def test_three_ways_projection_and_derived_grouped_alone(tmp_path):
    """Grouped alone measured (its own row and speed-up) or, when not run, derived from the grouped + batched sweep's
    steady seconds less its decode plus the sequential decode; the projection to 931 examples x every method x 2
    modes uses each way's steady seconds per example cell."""
    data = part("multi_request", 50.0, 20.0)
    rows = [{"length": 100, "way": w, "prefill_s": 1.0, "decode_s_sum": d} for w, d in (("sequential", 3.0),
                                                                                       ("grouped", 1.0))]
    d = report.derive({**data, "rows": rows, "all_methods": 14, "tasks": ["scbench_kv"]})
    (e,) = d["summary"]
    alone = e["grouped_sequential_derived"]
    assert alone["steady_s"] == (20.0 - 2 - 1) - 1.0 + 3.0 and alone["speedup_steady"] == 47.0 / alone["steady_s"]
    p = e["projection"]
    assert p["methods_x_modes"] == 2 and p["all_methods_x_modes"] == 28
    assert p["gpu_hours_all_sequential"] == 931 * 28 * (47.0 / 2) / 3600
    assert p["gpu_hours_all_grouped_sequential"] == 931 * 28 * (alone["steady_s"] / 2) / 3600
    run = {**data, "rows": rows, "sweeps": data["sweeps"] + [sweep("grouped_sequential", "multi_request", 25.0,
                                                                  data["sweeps"][0]["predictions"])]}
    (e,) = report.derive(run)["summary"]
    assert "grouped_sequential_derived" not in e and e["grouped_sequential"]["speedup"] == 2.0
    assert e["grouped_sequential"]["same_predictions"] == "2/2" and e["speedup"] == 2.5
    md = report.sweep_table(report.derive(run)["summary"])
    assert "| 100 | multi_request | grouped | 2 | 25 |" in md


def test_estimate_fits_the_measured_file():
    measured = ROOT / "results" / "perf" / "methods_gpu.json"
    args = (bench.GPU_METHODS, [32000, 131000], bench.MODES, list(bench.WAYS), 2)
    long, short = report.estimate(measured, *args, 64, 1), report.estimate(measured, *args, 16, 1)
    assert set(long["sweeps"]) == {f"{n}-{w}" for n in (32000, 131000) for w in bench.WAYS}
    for n in (32000, 131000):
        assert long["sweeps"][f"{n}-grouped"] < long["sweeps"][f"{n}-grouped_sequential"] \
            < long["sweeps"][f"{n}-sequential"]
    assert long["sweeps"]["131000-sequential"] > 2 * long["sweeps"]["32000-sequential"]
    assert short["total_s"] < long["total_s"] and f"~{long['total_s']:.0f} s" in long["text"]


def test_estimate_counts_a_prefill_both_modes_share_once():
    """With the query hidden and one context for both modes (policy.truncation=context, or no truncation at all) the
    grouped estimate counts the shared prefill, the shared score passes and the sparse prefills once per example;
    the sequential one is unchanged."""
    measured = ROOT / "results" / "perf" / "methods_gpu.json"
    hidden, ctx = ["policy.query_visible=false"], ["policy.query_visible=false", "policy.truncation=context"]
    assert report.modes_share(ctx, 131000, 5, 64) and report.modes_share(hidden, 32000, 5, 64)
    assert not report.modes_share(hidden, 131000, 5, 64) and not report.modes_share([], 32000, 5, 64)
    args = (measured, bench.GPU_METHODS, [131000], bench.MODES, ["sequential", "grouped"], 5, 64, 1)
    ref, one = report.estimate(*args, hidden)["sweeps"], report.estimate(*args, ctx)["sweeps"]
    assert ref["131000-sequential"] == one["131000-sequential"]
    # at least the dense prefill (~12 s) and KVzip's reconstruction (~28 s) fewer
    assert one["131000-grouped"] < ref["131000-grouped"] - 40


def test_cpu_dry_run_end_to_end(tmp_path):
    """Both sweeps on the tiny random model (float32): the grouped + batched sweep predicts what the sequential one
    does; DuoAttention gets gates of the tiny model's shape; the tables are written."""
    out = tmp_path / "m"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_methods.py"), "--cpu", "--model", "tiny-llama",
                        "--lengths", "400", "--methods", "full", "snapkv-1k", "duo_attention-1k", "--max-new", "4",
                        "--out", str(out)], capture_output=True, text=True, env={**os.environ,
                                                                                  "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["methods"] == ["full", "snapkv-1k", "duo_attention-1k-random"]
    assert [(s["way"], s["rc"], s["cells"]) for s in data["sweeps"]] == [("sequential", 0, 6), ("grouped", 0, 6)]
    (e,) = data["summary"]
    assert e["same_predictions"] == "12/12" and e["same_cells"]
    shared = {(r["config"]["name"], r["mode"]): r["prefill_shared"] for r in data["rows"] if r["way"] == "grouped"}
    assert shared == {("full", m): 2 for m in bench.MODES} | {("snapkv", m): 2 for m in bench.MODES} | {
        ("duo_attention", m): 1 for m in bench.MODES}
    assert {r["status"] for r in data["rows"]} == {"done"}
    runs = {(r["way"], r["mode"]): r["decode_runs"] for r in data["rows"]}
    assert runs == {("sequential", m): 1 for m in bench.MODES} | {("grouped", m): 3 for m in bench.MODES}
    assert e["grouped"]["decode_runs"] == 3  # every run of a mode's group decoded in one batch
    md = out.with_suffix(".md").read_text()
    assert "## Per method" in md and md.count("| 400 | multi_") == 6 + 3  # 6 runs; 2 ways + grouped alone (derived)
    assert "grouped (derived" in md and e["grouped_sequential_derived"]["steady_s"] > 0


def test_table_names_dense_fallback_layers():
    """A vertical-slash row whose first prefill fell back to dense says in how many layers; other rows say nothing."""
    row = {"length": 100, "mode": "multi_request", "method": "vertical_slash", "config": {"name": "vertical_slash"},
           "prefill_s": 1.0, "later_prefill_s": None, "warmup_s": 0.0, "decode_tok_s": 10.0, "decode_vs_full": 1.0,
           "decode_path": "graph", "kv_bytes": 2**30, "bytes_per_token": 2**30, "peak_mem_bytes": 2**31}
    assert "dense-fallback" not in report.table([row, {**row, "prefill_fallbacks": 0}])
    assert "| graph (prefill: 32 dense-fallback layers) |" in report.table([{**row, "prefill_fallbacks": 32}])


def test_later_examples_first_prefill():
    """Each example's first-turn prefill is kept in run order; the table brackets the later examples' median."""
    turns = [{"example_id": e, "prefill_s": s, "created": c}
             for e, s, c in (("a", 3.0, 1), ("a", 0.1, 2), ("b", 1.2, 5), ("c", 1.4, 3), ("c", .2, 4))]
    assert bench.first_prefills(turns) == [3.0, 1.4, 1.2]  # in the order the run reached them (b after c)
    row = {"length": 100, "mode": "multi_request", "method": "full", "config": {"name": "full"}, "prefill_s": 3.0,
           "later_prefill_s": None, "warmup_s": 0.0, "decode_tok_s": 10.0, "decode_vs_full": 1.0,
           "decode_path": "graph", "kv_bytes": 2**30, "bytes_per_token": 2**30, "peak_mem_bytes": 2**31}
    assert "| full | 3.00 (1.30) | - |" in report.table([{**row, "first_prefill_s_all": [3.0, 1.2, 1.4]}])
    assert "| full | 3.00 | - |" in report.table([{**row, "first_prefill_s_all": [3.0]}])
    assert "| full | 3.00 | - |" in report.table([row])


def test_steady_seconds_keep_a_later_examples_warmups():
    """Only the first example a run reached has its warm-ups taken out of the steady seconds: a later example's
    (graph captures recur per example) are work a long sweep pays each time."""
    turns = [{"example_id": e, "warmup_s": w, "created": c}
             for e, w, c in (("b", 0.5, 4), ("a", 9.0, 1), ("a", 0.25, 2), ("b", 0.0, 5), ("c", 0.125, 3))]
    assert bench.first_example_warmup(turns) == 9.25  # example a: reached first
    assert bench.first_example_warmup([]) == 0.0


def test_retry_lines_name_redone_work():
    """Runs that redid work after a failed attempt are summed per (context, way); none: no line."""
    rows = [{"length": 100, "way": "grouped", "retry_s": 1.5}, {"length": 100, "way": "grouped", "retry_s": 0.5},
            {"length": 100, "way": "sequential", "retry_s": 0.0}, {"length": 200, "way": "grouped"}]
    assert report.retry_lines(rows) == ("- 100 tokens, grouped + batched: 2 run(s) redid work after a failed attempt, "
                                        "2.0 s in all (`retry_s`; counted in the sweep's seconds, in no turn's prefill "
                                        "or decode)\n")
    assert report.retry_lines(rows[2:]) == ""
    # a grouped run that prefilled by itself after its failed attempt: its first prefill named too
    rows[0].update(prefill_shared=1, prefill_s=11.5)
    rows[1].update(prefill_shared=20, prefill_s=12.0)
    assert report.retry_lines(rows[:2]).endswith("2.0 s in all (`retry_s`; counted in the sweep's seconds, in no "
                                                "turn's prefill or decode); 1 of them then prefilled by themselves "
                                                "(11.5 s of first prefill, compression included, in their own "
                                                "`prefill_s` with `prefill_shared` 1)\n")


def test_together_step_reads_the_weights_once():
    """Runs decoded as one batch: each run's step alone, less the weight reads all but one of them skip (a share of
    the fastest run's step), so never less than the slowest run's step; no runs, no time."""
    w = report.WEIGHT_SHARE * 4.0
    assert report.together_step([4.0, 5.0, 6.0]) == pytest.approx(15.0 - 2 * w)
    assert report.together_step([4.0]) == 4.0 and report.together_step([]) == 0.0
    assert report.together_step([40.0, 4.0]) == pytest.approx(44.0 - w) and 44.0 - w > 40.0


def test_killed_sweep_keeps_its_output_as_text(tmp_path, monkeypatch):
    """A sweep stopped at its share of --deadline keeps what it printed, as text (subprocess hands the partial output
    over as bytes even with text=True), in the tail and in the --logs file."""
    def run(*a, **k):
        raise subprocess.TimeoutExpired(a[0], k["timeout"], output=b"line one\n", stderr=b"WARNING ran out\n")

    monkeypatch.setattr(bench.subprocess, "run", run)
    rc, _, tail = bench.run_cli(["method=full"], {}, 5.0, log=tmp_path / "x.log")
    assert rc == 124 and tail == (tmp_path / "x.log").read_text()
    assert tail.startswith("line one\nWARNING ran out\n") and "[killed after 5 s]" in tail and "b'" not in tail
