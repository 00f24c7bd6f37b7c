"""Sweeps through Hydra on a tiny random-weight model saved to disk: a failing job is recorded and the sweep goes
on; a re-launch resumes every job; the joblib launcher runs two jobs at once into one store."""
from __future__ import annotations

import pytest

from scbench.cli import main
from scbench.store import Store


def common(tiny_folder, tmp_path, db):
    return ["model=smollm2-135m", f"model.path={tiny_folder}", "model.name=tiny", "model.device=cpu",
            "model.dtype=float32",
            "model.window=4096", f"store={db}", "data.n=2", "data.length=200", "data.turns=2", "max_new_tokens=2",
            "progress=false", f"hydra.sweep.dir={tmp_path}/hydra"]


def turn_keys(db):
    store = Store(db)
    keys = [(t["run_id"], t["example_id"], t["turn"], t["created"]) for t in store.turns()]
    store.close()
    return keys


def failing_sweep(args, capsys) -> str:
    """Run a sweep that has failed jobs: it must exit 1; returns its stderr."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    return capsys.readouterr().err


def test_failed_job_recorded_and_sweep_resumes(tiny_folder, tmp_path, capsys):
    db = tmp_path / "sweep.sqlite"
    # job 0: max_turns=0 is a bad config; job 1 runs
    args = ["run", "-m", "max_turns=0,2", "mode=multi_request", *common(tiny_folder, tmp_path, db)]
    err = failing_sweep(args, capsys)
    assert "1 job(s) failed" in err and "job 0 (max_turns=0): SpecError: max_turns must be" in err
    store = Store(db)
    runs = {r["status"]: r for r in store.runs()}
    assert set(runs) == {"failed", "done"}
    assert "max_turns" in runs["failed"]["error"]
    assert len(store.turns()) == 4
    store.close()
    first = turn_keys(db)
    failing_sweep(args, capsys)  # re-launch: the good job computes nothing, the bad one fails again and is recorded again
    assert turn_keys(db) == first
    store = Store(db)
    assert sorted(r["status"] for r in store.runs()) == ["done", "failed"]
    store.close()


def test_bad_values_recorded_even_without_a_spec(tiny_folder, tmp_path, capsys):
    db = tmp_path / "bad.sqlite"
    base = [a for a in common(tiny_folder, tmp_path, db) if not a.startswith("data.length")]
    # data.length=oops fails when the data is generated (before any turn); the other job runs
    failing_sweep(["run", "-m", "data.length=200,oops", "mode=multi_request", *base], capsys)
    # a config that cannot even make a RunSpec (a required key deleted) is recorded under a config hash
    failing_sweep(["run", "-m", "~max_turns", "mode=multi_request", "data.length=200", *base], capsys)
    store = Store(db)
    runs = store.runs()
    assert sorted(r["status"] for r in runs) == ["done", "failed", "failed"]
    nospec = [r for r in runs if r["run_id"].startswith("cfg-")]
    assert len(nospec) == 1 and "max_turns" in nospec[0]["error"] and nospec[0]["mode"] == "multi_request"
    store.close()


def test_joblib_two_concurrent_jobs_one_store(tiny_folder, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    db = tmp_path / "joblib.sqlite"
    args = ["run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "mode=multi_turn,multi_request",
            *common(tiny_folder, tmp_path, db)]
    main(args)
    store = Store(db)
    runs = store.runs()
    assert len(runs) == 2 and {r["status"] for r in runs} == {"done"}
    keys = [(t["run_id"], t["example_id"], t["turn"]) for t in store.turns()]
    assert len(keys) == 8 and len(set(keys)) == 8  # 2 jobs x 2 examples x 2 turns, none lost or doubled
    store.close()


def test_submitit_local_launcher_one_store(tiny_folder, tmp_path):
    """The SLURM launcher's local executor: each job in its own submitit process, same store, same resume."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    db = tmp_path / "submitit.sqlite"
    args = ["run", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
            "mode=multi_turn,multi_request", *common(tiny_folder, tmp_path, db)]
    main(args)
    store = Store(db)
    assert sorted(r["status"] for r in store.runs()) == ["done", "done"]
    store.close()
    first = turn_keys(db)
    assert len(first) == 8 and len({k[:3] for k in first}) == 8
    main(args)  # re-launched through the same launcher: nothing recomputed
    assert turn_keys(db) == first


def test_sweep_of_failing_jobs_exits_nonzero_and_names_them(tiny_folder, tmp_path, capsys):
    db = tmp_path / "fail.sqlite"
    err = failing_sweep(["run", "-m", "method=streamingllm", "method.n_local=-1,abc", "mode=multi_request",
                         *common(tiny_folder, tmp_path, db)], capsys)
    assert "2 job(s) failed" in err
    assert "job 0 (method.n_local=-1): SpecError" in err and "job 1 (method.n_local=abc)" in err


def test_sweep_fails_when_the_store_cannot_record(tiny_folder, tmp_path, capsys, monkeypatch):
    """A store write failing mid-run (a full disk: ``disk I/O error``) fails the job and the sweep, and the run
    is marked failed through a fresh connection when the first one cannot write."""
    import sqlite3

    db = tmp_path / "io.sqlite"

    def broken_put(self, run_id, result):
        raise sqlite3.OperationalError("disk I/O error")

    real_finish = Store.finish_run
    calls = []

    def finish_once_broken(self, run_id, status="done", error=None):
        calls.append(status)
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        real_finish(self, run_id, status, error)

    monkeypatch.setattr(Store, "put", broken_put)
    monkeypatch.setattr(Store, "finish_run", finish_once_broken)
    err = failing_sweep(["run", "-m", "mode=multi_turn,multi_request", *common(tiny_folder, tmp_path, db)], capsys)
    assert "2 job(s) failed" in err and err.count("OperationalError: disk I/O error") == 2
    store = Store(db, readonly=True)
    runs = store.runs()
    assert [r["status"] for r in runs] == ["failed", "failed"] and all("disk I/O" in r["error"] for r in runs)
    store.close()
