"""Issue 20, defect 2: two runs of full attention on scbench_kv that differ only in max_new_tokens (24: capped, every
turn scores 0; 48: every turn scores 100), merged into one store. No format may pool them: md, csv, json, html, the
figures and `ls runs` show two runs told apart by `setting`, each with its own score, capped share and interval, and
every cost column means one thing (a per-turn mean, named so) in every format."""
from __future__ import annotations

import csv
import io
import json

from scbench.records import TurnResult, TurnStats
from scbench.store import Store
from scbench.store_merge import merge_stores

COMPUTED = {0: 1000, 1: 50}  # prefill tokens computed per turn: per-turn mean 525 (the old markdown summed: 2100)


def one_run(path, cap: int, score: float, flags: str) -> str:
    store = Store(path)
    rid = f"run-cap{cap}"
    spec = {"model": {"name": "tiny"}, "method": {"name": "full"}, "task": "scbench_kv", "task_variant": None,
            "mode": "multi_turn", "max_new_tokens": cap, "data": {"n": 2}}
    prov = {"method": {"name": "full", "params": {}, "stages": []},
            "task": {"name": "scbench_kv", "category": "string_retrieval"}}
    store.open_run(rid, model="tiny", method="full", method_label="full", task="scbench_kv", mode="multi_turn",
                   spec=spec, provenance=prov)
    for ex in ("0", "1"):
        for turn in (0, 1):
            stats = TurnStats(prompt_tokens=1000 + 50 * turn, prefill_computed=COMPUTED[turn],
                              prefill_reused=0 if turn == 0 else 1000, ttft_s=0.1, kv_bytes=2**20,
                              kv_full_bytes=2**20, flags=flags)
            store.put(rid, TurnResult(ex, turn, stats.prompt_tokens, "p", {"answer": "a"}, {"kv": score}, stats))
    store.finish_run(rid)
    store.close()
    return rid


def merged(tmp_path):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    one_run(a, 24, 0.0, "capped")
    one_run(b, 48, 1.0, "")
    merge_stores(tmp_path / "m.sqlite", [a, b])
    return tmp_path / "m.sqlite"


def test_two_settings_stay_apart_in_every_format(tmp_path, capsys):
    from scbench.cli import main
    from scbench.report.export import records
    from scbench.report.figures import turn_curves
    from scbench.report.html import build_html
    from scbench.report.table import leaderboard

    path = merged(tmp_path)
    store = Store(path)

    board = leaderboard(store)
    assert board["setting"].tolist() == ["max_new_tokens=24", "max_new_tokens=48"]
    assert board["avg"].tolist() == [0.0, 100.0] and board["capped %"].tolist() == [100.0, 0.0]
    assert board["prefill tok computed (mean/turn)"].tolist() == [525.0, 525.0]
    assert "prefill tok computed" not in board  # no unnamed total

    main(["export", "--store", str(path), "--format", "md"])
    md = capsys.readouterr().out
    rows = [line for line in md.splitlines() if line.startswith("| tiny | full |")]
    assert len(rows) == 2 + 2  # two leaderboard rows, two category rows
    assert "max_new_tokens=24" in rows[0] and "| 0.0 |" in rows[0] and "| 100.0 |" in rows[1]
    assert "prefill tok computed (mean/turn)" in md and "| 525.0 |" in rows[0]

    main(["export", "--store", str(path), "--format", "csv"])
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["setting"], float(r["avg"]), float(r["capped %"])) for r in table] == [
        ("max_new_tokens=24", 0.0, 100.0), ("max_new_tokens=48", 100.0, 0.0)]
    assert {float(r["prefill tok computed (mean/turn)"]) for r in table} == {525.0}

    recs = records(store)
    assert len(recs) == 4 and {r["setting"] for r in recs} == {"max_new_tokens=24", "max_new_tokens=48"}
    for r in recs:
        low = r["setting"].endswith("24")
        assert r["score"] == (0.0 if low else 100.0) and r["capped_share"] == (1.0 if low else 0.0)
        assert r["score_ci95"] == [r["score"], r["score"]] and r["n_examples"] == 2
    # the per-turn records' cost means average to the leaderboard's per-turn mean
    assert sum(r["costs"]["prefill_computed"] for r in recs) / len(recs) == 525.0
    main(["export", "--store", str(path), "--format", "json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(recs, default=str))

    page = build_html(store)
    assert page.count("max_new_tokens=24") >= 2 and page.count("max_new_tokens=48") >= 2  # board + categories
    assert "<th>prefill tok computed (mean/turn)</th>" in page and 'data-v="525.0"' in page
    assert "<th>capped %</th>" in page and "<th>avg ci95</th>" in page

    fig = turn_curves(recs)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["full [max_new_tokens=24] n=2", "full [max_new_tokens=48] n=2"]

    main(["ls", "runs", "--store", str(path)])
    listing = capsys.readouterr().out.splitlines()
    assert any("capped=4" in line and "setting: max_new_tokens=24" in line for line in listing)
    assert any("setting: max_new_tokens=48" in line and "capped" not in line for line in listing)
    store.close()
