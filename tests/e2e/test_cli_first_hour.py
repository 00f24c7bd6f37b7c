"""The first hour of a new user, on the tiny random Llama (model=tiny-llama, seconds): the end-of-run and
end-of-sweep tables, `show`, `export --samples`, `ls runs`, a finished re-launch that loads no model, Hydra's
folder next to the store, no cache-argument deprecation, `export | head`, an out-of-tree plugin run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scbench.cli import main
from scbench.store import Store

SCBENCH = [sys.executable, "-c", "from scbench.cli import main; main()"]
TINY = ["model=tiny-llama", "data.n=2", "data.length=200", "data.turns=2", "max_turns=2", "max_new_tokens=4",
        "progress=false"]
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "plugins" / "random_evict"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """`scbench run` as a user types it, in a fresh folder, as a subprocess (warnings and files as they land)."""
    cwd = tmp_path_factory.mktemp("cwd")
    store = cwd / "out" / "s.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*SCBENCH, "run", *TINY, f"store={store}"], cwd=cwd, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    return cwd, store, p


def test_run_prints_the_table(first_run):
    _, store, p = first_run
    out = p.stdout
    assert "model: tiny-llama" in out
    header = next(line for line in out.splitlines() if line.startswith("task"))
    for col in ("mode", "method", "T1", "T2", "avg", "n", "capped", "computed", "reused", "TTFT s", "tok/s", "KV/full"):
        assert col in header.split("  ") or f" {col}" in header, col
    row = next(line for line in out.splitlines() if line.startswith("kv "))
    assert "multi_turn" in row and "full" in row and "100%" in row  # 4 new tokens: every turn hits the cap


def test_no_stray_files_and_no_deprecation_noise(first_run):
    cwd, store, p = first_run
    assert sorted(x.name for x in cwd.iterdir()) == ["out"]  # no results/ in the working folder
    assert (store.parent / "hydra").is_dir()  # Hydra's log next to the store
    assert "deprecated" not in p.stderr and "FutureWarning" not in p.stderr, p.stderr


def test_relaunch_of_a_finished_run_loads_nothing(first_run, monkeypatch, capsys):
    import scbench.run

    cwd, store, _ = first_run
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(scbench.run, "get_engine", lambda *a, **k: pytest.fail("the model was loaded"))
    main(["run", *TINY, f"store={store}"])
    out = capsys.readouterr().out  # Hydra's job log goes to stdout
    assert "is done (every turn stored in" in out and "nothing to do" in out
    assert "model: tiny-llama" in out  # the same table again


def test_ls_runs_and_show(first_run, capsys):
    _, store, _ = first_run
    main(["ls", "runs", "--store", str(store)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:8] == ["run", "status", "task", "mode", "score", "n", "turns", "model"]
    line = out.splitlines()[2]
    assert " done " in line and "tiny-llama" in line and " 2 " in line and " 4/4 " in line
    assert "data.length=200 data.turns=2 max_new_tokens=4 max_turns=2" in line  # what differs from the default
    run_id = line.split()[0]
    main(["show", run_id, "--store", str(store), "--example", "1", "--turn", "2", "--width", "60"])
    out = capsys.readouterr().out
    assert "example 1" in out and "turn 2" in out and out.count("--- example") == 1
    for field in ("question:", "prediction:", "reference:", "score:", "costs:", "prefill_reused="):
        assert field in out
    assert "[..." in out  # the question's long key elided at 60 characters
    with pytest.raises(SystemExit) as e:
        main(["show", run_id, "--store", str(store), "--example", "5"])
    assert e.value.code == 2 and "--example takes 0..1" in capsys.readouterr().err


def test_export_samples_jsonl(first_run, capsys):
    _, store, _ = first_run
    main(["export", "--samples", "--format", "jsonl", "--store", str(store)])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4
    for rec in lines:
        assert {"run_id", "example", "turn", "question", "prediction", "answer", "scores", "prefill_computed",
                "kv_bytes", "ttft_s"} <= set(rec)
        assert rec["answer"] in json.dumps(rec["question"]) or rec["question"].startswith("Key:")


def test_ls_runs_on_a_missing_store_creates_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["ls", "runs", "--store", str(tmp_path / "none" / "s.sqlite")])
    assert e.value.code == 2 and "no results store at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_into_a_closed_pipe(tmp_path):
    from support import make_store

    db = tmp_path / "big.sqlite"
    make_store(db)
    store = Store(db)
    big = "x" * 4000
    store.db.execute("UPDATE turns SET prediction=?", (big,))  # ~400 KB of samples: more than a pipe holds
    store.close()
    cmd = " ".join(SCBENCH[:2]) + f" '{SCBENCH[2]}' export --samples --format jsonl --store {db} | head -c 100"
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    assert len(p.stdout) == 100 and "BrokenPipe" not in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_sweep_prints_one_table_and_a_plugin_method_runs(tmp_path, capsys, monkeypatch, clean_registries):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "sweep.sqlite"
    main(["run", "-m", "method=streamingllm-1k,random_evict", "task=passkey", f"plugins={FIXTURE}", *TINY,
          f"store={store}"])
    out = capsys.readouterr().out
    table = out[out.index("model: tiny-llama"):]
    assert table.count("passkey  multi_turn") == 2 and "random_evict" in table and "streamingllm" in table
    assert {r["status"] for r in Store(store).runs()} == {"done"}
