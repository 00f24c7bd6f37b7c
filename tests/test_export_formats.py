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

REQUIRED = {"schema", "schema_version", "model", "method", "method_label", "budget", "mode", "task", "task_variant",
            "category", "stages", "turn", "n_examples", "scores", "score", "costs", "run_id", "status", "provenance"}
COSTS = {"prompt_tokens", "prefill_computed", "prefill_reused", "ttft_s", "decode_tok_s", "kv_bytes", "kv_full_bytes",
         "kv_ratio", "slow_tier_bytes", "loaded_bytes", "peak_mem_bytes", "attn_density"}

GRID = [  # method config, stages, kept fraction of the full KV
    ({"name": "full"}, [], 1.0),
    ({"name": "snapkv", "budget": 0.125, "window": 32, "kernel": 5}, ["compression"], 0.125),
    ({"name": "snapkv", "budget": 0.25, "window": 32, "kernel": 5}, ["compression"], 0.25),
    ({"name": "ashape", "n_init": 32, "n_local": 224}, ["generation"], 1.0),
]
TASKS = [("scbench_kv", "string_retrieval", "kv"), ("scbench_qa_eng", "semantic_retrieval", "qa_eng")]


def make_store(path):
    store = Store(path)
    for m, (method, stages, frac) in enumerate(GRID):
        for mode in ("multi_turn", "multi_request"):
            for t, (task, category, metric) in enumerate(TASKS):
                run_id = f"r{m}{mode[6]}{t}"
                spec = {"model": {"name": "tiny"}, "method": method, "task": task, "task_variant": None, "mode": mode}
                prov = {"git": {"commit": "abc", "dirty": False}, "packages": {"torch": "x"}, "engine": {"model": "tiny"},
                        "method": {"name": method["name"], "params": method, "stages": stages},
                        "task": {"name": task, "version": "1", "category": category, "variant": "faithful"}}
                label = method["name"] if len(method) == 1 else f"{method['name']}({method.get('budget', '')})"
                store.open_run(run_id, model="tiny", method=method["name"], method_label=label, task=task, mode=mode,
                               spec=spec, provenance=prov)
                for ex in range(2):
                    for turn in range(3):
                        score = min(1.0, frac + 0.1 * ex + 0.05 * turn)
                        stats = TurnStats(prompt_tokens=1000 + 50 * turn, prefill_computed=1000 if turn == 0 else 50,
                                          prefill_reused=0 if turn == 0 else 1000, ttft_s=0.1, decode_s=0.2,
                                          decode_tok_s=40.0, kv_bytes=int(frac * 2**22), kv_full_bytes=2**22,
                                          attn_density=0.3 if stages == ["generation"] else 1.0)
                        store.put(run_id, TurnResult(str(ex), turn, stats.prompt_tokens, "p", {"answer": "a"},
                                                     {metric: score}, stats))
                store.finish_run(run_id)
    store.record_failure("bad", spec={"model": {"name": "tiny"}, "method": {"name": "kivi"}, "task": "scbench_kv",
                                      "mode": "multi_turn"}, error="OutOfMemoryError: CUDA out of memory")
    store.close()
    return path


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
