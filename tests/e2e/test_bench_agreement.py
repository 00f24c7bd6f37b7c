"""scripts/bench_agreement.py: every way of executing a sweep (fast decode, grouped prefill, batched decode) against
the plain reference loop, turn by turn; end to end on the tiny model in float32, where the ways must agree."""
from __future__ import annotations

import json

import pytest

from support import load_script

agree = load_script("bench_agreement.py")


def turn(pred, score=1.0, path="graph"):
    return {"prediction": pred, "score": score, "decode_path": path, "decode_batch": None}


def test_leading_share_counts_tokens_before_the_first_difference():
    assert agree.leading_share([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert agree.leading_share([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert agree.leading_share([1, 2], [1, 2, 3, 4]) == 0.5  # a longer answer is not identical
    assert agree.leading_share([1, 2, 3, 4], [1, 2]) == 0.5
    assert agree.leading_share([], []) == 1.0 and agree.leading_share([], [5]) == 0.0
    assert agree.leading_share([7], [8]) == 0.0


def test_compare_per_way_method_and_mode():
    ref = {"full|multi_turn|kv|0|0": turn("a b c d", 1.0, "plain"), "full|multi_turn|kv|0|1": turn("x y", 0.0, "plain"),
           "snapkv|multi_request|kv|0|0": turn("p q", 1.0, "plain")}
    fast = {"full|multi_turn|kv|0|0": turn("a b z d", 0.0), "full|multi_turn|kv|0|1": turn("x y", 0.0)}
    rows = agree.compare({"plain": ref, "fast": fast}, str.split)
    full = next(r for r in rows if r["method"] == "full")
    assert (full["way"], full["mode"], full["turns"], full["missing"], full["same"]) == ("fast", "multi_turn", 2, 0, 1)
    assert full["leading_share"] == (0.5 + 1.0) / 2
    assert (full["score_ref"], full["score"], full["score_changed"]) == (0.5, 0.0, 1)
    assert full["paths"] == ["graph"]
    snap = next(r for r in rows if r["method"] == "snapkv")
    assert snap["turns"] == 0 and snap["missing"] == 1  # a run the way did not finish is counted, not compared
    assert not any(r["way"] == "plain" for r in rows)
    other = agree.compare({"plain": ref, "fast": fast}, str.split, reference="fast")  # another reference
    assert {r["way"] for r in other} == {"plain"} and next(r for r in other if r["method"] == "full")["same"] == 1


@pytest.mark.cpu_kernels  # the fused step's kernels in the interpreter, through the runner
def test_tiny_model_end_to_end_every_way_agrees_in_float32(tmp_path, monkeypatch):
    out = tmp_path / "agree"
    monkeypatch.setattr("sys.argv", ["bench_agreement.py", "--model", "tiny-llama", "--methods", "full", "snapkv-1k",
                                     "--modes", "multi_request", "--tasks", "scbench_kv", "--length", "200",
                                     "--turns", "2", "--max-new", "4", "--ways", "plain_fp32", "fast", "batched",
                                     "--reference", "plain_fp32", "--out", str(out)])
    agree.main()
    data = json.loads(out.with_suffix(".json").read_text())
    assert [s["way"] for s in data["sweeps"]] == ["plain_fp32", "fast", "batched"]
    assert all(s["rc"] == 0 and not s["failed"] for s in data["sweeps"]), [s["log_tail"] for s in data["sweeps"]]
    rows = data["comparison"]
    assert {(r["way"], r["method"].partition("(")[0]) for r in rows} == {(w, m) for w in ("fast", "batched")
                                                                          for m in ("full", "snapkv")}
    assert all(r["turns"] == 2 and r["same"] == 2 and r["leading_share"] == 1.0 and r["score_changed"] == 0
               for r in rows)
    assert next(r for r in rows if r["way"] == "batched")["paths"] == ["batched"]
    md = out.with_suffix(".md").read_text()
    assert "every way against `plain_fp32` (share_prefill=false timing=sequential +model.decode=plain " in md
    assert "## batched (share_prefill=true timing=batched): 4/4 turns identical, 0 scores changed" in md


def test_table_heads_each_way_with_its_turn_weighted_mean_score():
    ref = {"full|multi_turn|kv|0|0": turn("a", 1.0, "plain"), "full|multi_turn|kv|0|1": turn("b", 0.0, "plain"),
           "full|multi_turn|kv|0|2": turn("c", 1.0, "plain"), "snapkv|multi_request|kv|0|0": turn("p", 0.0, "plain")}
    fast = {"full|multi_turn|kv|0|0": turn("a", 1.0), "full|multi_turn|kv|0|1": turn("b", 0.0),
            "full|multi_turn|kv|0|2": turn("z", 0.0), "snapkv|multi_request|kv|0|0": turn("q", 1.0)}
    data = {"model": "m", "dtype": "bfloat16 (auto)", "device": "d", "torch": "t", "commit": "c", "tasks": ["kv"],
            "length": 1, "examples": 1, "turns": 3, "max_new_tokens": 4, "reference": "plain",
            "sweeps": [{"way": "plain", "turns": ref}, {"way": "fast_fp32", "turns": fast}]}
    data["comparison"] = agree.compare({"plain": ref, "fast_fp32": fast}, str.split)
    md = agree.table(data)
    # (3 x 2/3 + 1 x 0) / 4 -> (3 x 1/3 + 1 x 1) / 4: weighted by turns, not a mean of the two rows' means
    assert "## fast_fp32 (share_prefill=false timing=sequential model.dtype=float32): 2/4 turns identical, " \
           "2 scores changed, mean score 0.500 -> 0.500" in md
    assert md.startswith("# Prediction agreement on m (bfloat16 (auto); the *_fp32 ways float32, d,")
