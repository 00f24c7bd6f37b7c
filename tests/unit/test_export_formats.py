"""JSON (versioned schema), HTML page and figure export from a synthetic store (rows inserted directly)."""
from __future__ import annotations

import json
import re

import pytest

from scbench.cli import main
from scbench.records import TurnResult, TurnStats
from scbench.report.export import EXPORT_SCHEMA_VERSION, method_budget
from scbench.report.figures import pareto_front
from scbench.store import Store
from support import GRID, TASKS, make_store

REQUIRED = {"schema", "schema_version", "model", "method", "method_label", "budget", "mode", "task", "task_variant",
            "category", "stages", "turn", "n_examples", "scores", "score", "costs", "run_id", "status", "provenance"}
COSTS = {"prompt_tokens", "prefill_computed", "prefill_reused", "ttft_s", "decode_tok_s", "kv_bytes", "kv_full_bytes",
         "kv_ratio", "slow_tier_bytes", "loaded_bytes", "peak_mem_bytes", "attn_density"}

@pytest.fixture(scope="module")
def db(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("export") / "s.sqlite")


def test_json_schema(db, tmp_path, capsys):
    out = tmp_path / "board.json"
    main(["export", "--store", str(db), "--format", "json", "--out", str(out)])
    recs = json.loads(out.read_text())
    assert len(recs) == len(GRID) * 2 * len(TASKS) * 3  # model x method x budget x mode x task x turn
    for r in recs:
        assert REQUIRED <= set(r) and COSTS <= set(r["costs"])
        assert r["schema"] == "scbench.results" and r["schema_version"] == EXPORT_SCHEMA_VERSION
        assert r["n_examples"] == 2 and r["provenance"]["git"]["commit"] == "abc"
    keys = {(r["method"], r["budget"], r["mode"], r["task"], r["turn"]) for r in recs}
    assert len(keys) == len(recs)
    snap = [r for r in recs if r["budget"] == "1/8" and r["task"] == "scbench_kv" and r["mode"] == "multi_turn"]
    assert [r["turn"] for r in snap] == [1, 2, 3]
    assert snap[0]["scores"] == {"kv": pytest.approx(17.5)} and snap[0]["costs"]["kv_ratio"] == pytest.approx(0.125)
    assert snap[0]["stages"] == ["compression"] and snap[0]["category"] == "string_retrieval"
    assert snap[1]["costs"]["prefill_reused"] == 1000


@pytest.mark.parametrize("method,label", [({"name": "full"}, "full"), ({"name": "snapkv", "budget": 0.03125}, "1/32"),
                                          ({"name": "h2o", "budget": 256}, "256"), ({"name": "kivi", "bits": 2}, "2bit"),
                                          ({"name": "streamingllm", "n_init": 4, "n_local": 60}, "4+60")])
def test_method_budget(method, label):
    assert method_budget(method) == label


def test_pareto_front():
    pts = [(1, 10), (2, 5), (2, 20), (4, 15), (8, 30), (8, 25)]
    assert pareto_front(pts) == [(1, 10), (2, 20), (8, 30)]


def test_html_page_self_contained(db, tmp_path):
    out = tmp_path / "board.html"
    main(["export", "--store", str(db), "--format", "html", "--out", str(out)])
    page = out.read_text()
    assert page.count("data:image/svg+xml;base64,") == 3
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched at view time
    assert 'id="board"' in page and '<select name="category">' in page and '<select name="stages">' in page
    assert page.count("<tr data-category=") == len(GRID) * 2 * len(TASKS)
    assert "OutOfMemoryError" in page  # failed runs are listed


def test_plot_writes_png_and_svg(db, tmp_path):
    main(["plot", "--store", str(db), "--out", str(tmp_path / "figs")])
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == sorted(f"{n}.{e}" for n in ("turn_curves", "accuracy_vs_budget", "accuracy_vs_kv_bytes")
                           for e in ("png", "svg"))
    assert (tmp_path / "figs" / "turn_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_export_missing_store(tmp_path):
    with pytest.raises(SystemExit):
        main(["export", "--store", str(tmp_path / "none.sqlite"), "--format", "json"])
