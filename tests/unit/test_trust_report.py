"""Bootstrap intervals against hand-computed cases, the `setting` label of colliding runs, the paper layout."""
from __future__ import annotations

import json

import pytest

from support import make_store

from scbench.report import trust
from scbench.report.paper import paper_table
from scbench.store import Store


def test_bootstrap_hand_computed():
    # [0, 0, 0, 100]: a resample's mean is 25 * (number of 100s drawn), k ~ Binomial(4, 1/4).
    # P(mean = 0) = (3/4)^4 = 0.316 > 2.5 %  -> low = 0
    # P(mean = 100) = (1/4)^4 = 0.0039 < 2.5 % but P(mean >= 75) = 4 (1/4)^3 (3/4) + (1/4)^4 = 0.0508 -> high = 75
    assert trust.bootstrap_ci([0, 0, 0, 100]) == (0.0, 75.0)
    assert trust.bootstrap_ci([0, 100]) == (0.0, 100.0)  # P(0) = P(100) = 1/4
    assert trust.bootstrap_ci([10, 10, 10]) == (10.0, 10.0)
    assert trust.bootstrap_ci([42.0]) == (42.0, 42.0) and trust.bootstrap_ci([]) == (None, None)
    # a 50 % interval of the same case: P(mean <= 0) = 0.316 < 25 %? no -> low 0; P(mean >= 50) = 0.262 > 25 % -> 50
    assert trust.bootstrap_ci([0, 0, 0, 100], level=0.5) == (0.0, 50.0)
    assert trust.bootstrap_ci([1, 5, 9, 3], seed=7) == trust.bootstrap_ci([1, 5, 9, 3], seed=7)  # seeded


def test_stratified_hand_computed():
    # category = mean of two tasks: task A [0, 100] (mean 0 / 50 / 100 w.p. 1/4, 1/2, 1/4), task B always 50
    # -> 25 / 50 / 75 w.p. 1/4, 1/2, 1/4 -> (25, 75)
    assert trust.stratified_ci([[0, 100], [50, 50]]) == (25.0, 75.0)


def test_settings_name_what_differs():
    spec = {"model": {"name": "m"}, "method": {"name": "full"}, "task": "scbench_kv", "max_new_tokens": 24,
            "data": {"n": 2}}
    runs = [{"run_id": "a", "model": "m", "method_label": "full", "task": "scbench_kv", "mode": "multi_turn",
             "spec": json.dumps(spec)},
            {"run_id": "b", "model": "m", "method_label": "full", "task": "scbench_kv", "mode": "multi_turn",
             "spec": json.dumps({**spec, "max_new_tokens": 48})},
            {"run_id": "c", "model": "m", "method_label": "full", "task": "scbench_kv", "mode": "multi_request",
             "spec": json.dumps(spec)}]
    assert trust.settings(runs) == {"a": "max_new_tokens=24", "b": "max_new_tokens=48", "c": ""}


def test_flag_share():
    turns = [{"flags": "capped"}, {"flags": ""}, {"flags": "unfired,capped"}, {"flags": None}]
    assert trust.flag_share(turns, "capped") == 0.5 and trust.flag_share([], "capped") == 0.0


def test_paper_layout(tmp_path):
    store = Store(make_store(tmp_path / "s.sqlite"))
    text = paper_table(store)
    blocks = [b for b in text.split("### ") if b.strip()]
    assert [b.splitlines()[0] for b in blocks] == ["multi_request · tiny", "multi_turn · tiny"]
    header = blocks[1].splitlines()[2]
    assert header.startswith("| method | Retr.KV | String avg | En.QA | Semantic avg | Avg. |")
    rows = {line.split(" | ")[0][2:]: line for line in blocks[1].splitlines()[4:]}
    assert set(rows) == {"full", "snapkv(0.125)", "snapkv(0.25)", "ashape()"}
    # full: kv scores 1.0 everywhere -> 100.0; qa same -> Avg. 100.0
    assert rows["full"].rstrip(" |").endswith("100.0")
    assert "paper:" not in text
    with_anchors = paper_table(store, anchors=True)
    assert "| paper: full attention, Llama-3.1-8B-Instruct | - | 57.1 | - | - | 48.7 |" in with_anchors
    assert "| paper: full attention, Llama-3.1-8B-Instruct | - | - | - | - | 37.2 |" in with_anchors


@pytest.mark.parametrize("fmt", ["paper"])
def test_cli_export_paper(tmp_path, capsys, fmt):
    from scbench.cli import main

    path = make_store(tmp_path / "s.sqlite")
    main(["export", "--store", str(path), "--format", fmt, "--anchors"])
    out = capsys.readouterr().out
    assert "### multi_turn · tiny" in out and "paper: KIVI (2-bit)" in out
