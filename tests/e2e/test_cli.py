"""The CLI end to end: data generate, run (single and -m sweep) on the embedded model, ls, export."""
from __future__ import annotations

import json

import pytest

from scbench.cli import main
from scbench.store import Store


def test_data_generate_writes_rows(tmp_path, capsys):
    main(["data", "generate", "task=scbench_kv,scbench_vt", "length=300", "n=2", "turns=2", "seed=3",
          f"out={tmp_path}", "model=none"])
    rows = [json.loads(line) for line in (tmp_path / "scbench_kv.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["multi_turns"]) == 2 for r in rows)
    again = tmp_path / "again"
    main(["data", "generate", "task=scbench_kv", "length=300", "n=2", "turns=2", "seed=3", f"out={again}", "model=none"])
    assert (again / "scbench_kv.jsonl").read_text() == (tmp_path / "scbench_kv.jsonl").read_text()  # deterministic
    assert (tmp_path / "scbench_vt.jsonl").exists()


def test_data_generate_bad_args():
    with pytest.raises(SystemExit):
        main(["data", "generate", "task=scbench_kv", "lenght=300"])


@pytest.mark.slow
def test_run_sweep_resume_and_export(tmp_path, capsys, embedded_engine):
    db = tmp_path / "cli.sqlite"
    args = ["run", "-m", "mode=multi_turn,multi_request", "method=full,streamingllm-1k", f"store={db}",
            "data.n=1", "data.length=250", "data.turns=2", "max_turns=2", "max_new_tokens=4", "progress=false",
            f"hydra.sweep.dir={tmp_path}/hydra"]
    main(args)
    store = Store(db)
    runs = store.runs()
    assert len(runs) == 4 and {r["status"] for r in runs} == {"done"}
    assert len(store.turns()) == 8
    first = {(t["run_id"], t["example_id"], t["turn"]): t["created"] for t in store.turns()}
    main(args)  # resume: nothing recomputed
    assert {(t["run_id"], t["example_id"], t["turn"]): t["created"] for t in store.turns()} == first
    capsys.readouterr()
    main(["ls", "runs", "--store", str(db)])
    assert capsys.readouterr().out.count("done") == 4
    main(["export", "--store", str(db), "--format", "json"])
    board = json.loads(capsys.readouterr().out)
    assert {b["mode"] for b in board} == {"multi_turn", "multi_request"}


def test_ls(capsys):
    main(["ls", "tasks"])
    out = capsys.readouterr().out
    assert "scbench_kv" in out and "string_retrieval" in out
    main(["ls", "methods"])
    assert "streamingllm" in capsys.readouterr().out
