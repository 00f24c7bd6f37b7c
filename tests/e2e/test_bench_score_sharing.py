"""scripts/bench_score_sharing.py: a budget sweep run grouped with every run scoring alone and with shared scores,
end to end on the tiny model: the same predictions, the shared way's runs record scores_shared."""
from __future__ import annotations

import json

from support import load_script

bench = load_script("bench_score_sharing.py")


def test_tiny_budget_sweep_both_ways(tmp_path, monkeypatch):
    out = tmp_path / "ss"
    monkeypatch.setattr("sys.argv", ["bench_score_sharing.py", "--model", "tiny-llama", "--length", "300",
                                     "--sweep", "kvzip-1k:32,64", "--max-new", "3", "--out", str(out)])
    bench.main()
    data = json.loads(out.with_suffix(".json").read_text())
    (sweep,) = data["sweeps"]
    assert sweep["same"] == "4/4"  # 2 runs x 2 turns, each prediction equal in both ways
    ways = sweep["ways"]
    assert [w["rc"] for w in ways.values()] == [0, 0]
    assert sorted(r["scores_shared"] for r in ways["alone"]["runs"]) == [1, 1]
    assert sorted(r["scores_shared"] for r in ways["shared"]["runs"]) == [2, 2]
    # a reuse reports the one computation's measured seconds: both shared runs show the same score_prefill_s (+/-
    # the copy), each run alone its own
    a, b = sorted(r["score_prefill_s"] for r in ways["shared"]["runs"])
    assert a > 0 and b - a < 0.05 + 0.1 * a
    md = out.with_suffix(".md").read_text()
    assert "| kvzip-1k:32,64 | shared |" in md and "| kvzip-1k:32,64 | alone |" in md
