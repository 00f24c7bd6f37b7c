"""Grouped sweeps (scbench/group.py): runs sharing one first prefill per example store the same rows as separate
runs, for every method that declares a dense first prefill; a kill in the middle of a grouped sweep loses nothing
finished and a re-launch completes it; the CLI groups basic-launcher sweeps and can be switched off."""
from __future__ import annotations

import pytest

from scbench.group import Job, can_share, plan_groups, run_jobs
from scbench.registry import METHODS
from scbench.run import run_spec
from scbench.store import Store
from support import SWEEP_CFGS as METHOD_CFGS, SWEEP_RIDERS as RIDERS, sweep_rows as rows, sweep_spec as spec

def test_every_dense_prefill_method_is_covered():
    shared = {n for n in METHODS.names() if can_share(METHODS.get(n)) and "hf" in METHODS.get(n).engines}
    assert shared == set(METHOD_CFGS), "add the new method to METHOD_CFGS so its grouped rows are compared"


@pytest.mark.parametrize("timing", ["sequential", "batched"])
@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_grouped_rows_equal_separate_runs(tiny_engine, tmp_path, mode, timing):
    jobs = [Job(spec(cfg, mode), str(tmp_path / "grouped.sqlite"), progress=False, timing=timing)
            for cfg in METHOD_CFGS.values()]
    assert len(plan_groups(jobs)) == 1
    outcomes = run_jobs(jobs, engine=tiny_engine)
    assert [o.error for o in outcomes] == [None] * len(jobs) and {o.shared for o in outcomes} == {len(jobs)}
    for job in jobs:
        run_spec(job.spec, str(tmp_path / "separate.sqlite"), engine=tiny_engine, progress=False)
    grouped, shared, g_runs = rows(tmp_path / "grouped.sqlite")
    separate, alone, s_runs = rows(tmp_path / "separate.sqlite")
    assert g_runs == s_runs and set(g_runs) == {o.run_id for o in outcomes}  # same run ids, labels, status
    assert grouped == separate  # predictions, scores and every non-timing cost column
    assert {v for k, v in shared.items() if k[2] == 0} == {len(jobs)} and set(alone.values()) == {1}
    assert {v for k, v in shared.items() if k[2] > 0} == {1}  # later turns reuse the cache: nothing shared
    store = Store(str(tmp_path / "grouped.sqlite"))
    together = {(t["decode_runs"], t["decode_batch"]) for t in store.turns()}
    store.close()
    # batched: the runs that batch decode an example's turns (3 each) in one batch; a run whose own tokens outgrow
    # its method's window (RetrievalAttention's n_local here) decodes alone; sequential: a turn at a time
    batched = together - {(1, 1)}
    assert (batched and all(b == 3 * r for r, b in batched) and max(batched)[0] >= len(jobs) - 2
            if timing == "batched" else together == {(1, 1)})


SCORE_SWEEP = {  # name: (config, runs sharing its scores); KVzip x 3, H2O x 2, SnapKV's window x 2 score once each
    "kvzip-64": ({"name": "kvzip", "budget": 64, "chunk": 128}, 3),
    "kvzip-128": ({"name": "kvzip", "budget": 128, "chunk": 128, "n_recent": 8}, 3),
    "kvzip-uniform": ({"name": "kvzip", "budget": 96, "chunk": 128, "level": "uniform"}, 3),
    "h2o-64": ({"name": "h2o", "budget": 64}, 2), "h2o-128": ({"name": "h2o", "budget": 128, "recent_ratio": 0.25}, 2),
    "snapkv": ({"name": "snapkv", "budget": 64, "window": 8, "kernel": 5}, 2),
    "pyramidkv": ({"name": "pyramidkv", "budget": 96, "window": 8, "kernel": 5}, 2),
    "snapkv-w16": ({"name": "snapkv", "budget": 96, "window": 16, "kernel": 5}, 1),  # another window: scored alone
    "full": ({"name": "full"}, 1),
}


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_budget_sweep_scores_once_and_rows_equal_separate_runs(tiny_engine, tmp_path, monkeypatch, mode):
    """A sweep over budgets scores each example once per score key (Method.score_key): KVzip's reconstruction
    forwards run once for its three runs, and every run stores the rows it stores alone."""
    import scbench.methods.kvzip as kvzip

    calls, real = [], kvzip.reconstruction_scores

    def counted(session, ids, *args):
        calls.append(len(ids))
        return real(session, ids, *args)

    monkeypatch.setattr(kvzip, "reconstruction_scores", counted)
    jobs = [Job(spec(cfg, mode), str(tmp_path / "grouped.sqlite"), progress=False) for cfg, _ in SCORE_SWEEP.values()]
    name_of = {id(job): name for name, job in zip(SCORE_SWEEP, jobs)}
    outcomes = run_jobs(jobs, engine=tiny_engine)
    assert [o.error for o in outcomes] == [None] * len(jobs)
    assert len(calls) == 2  # one reconstruction per example (2 examples) for the three KVzip runs
    calls.clear()
    for job in jobs:
        run_spec(job.spec, str(tmp_path / "separate.sqlite"), engine=tiny_engine, progress=False)
    assert len(calls) == 3 * 2
    grouped, _, g_runs = rows(tmp_path / "grouped.sqlite")
    separate, _, s_runs = rows(tmp_path / "separate.sqlite")
    assert g_runs == s_runs and grouped == separate  # predictions, scores, kept bytes, score tokens
    run_name = {o.run_id: name_of[id(o.job)] for o in outcomes}
    store = Store(str(tmp_path / "grouped.sqlite"))
    got = {}
    for t in store.turns():
        got.setdefault(run_name[t["run_id"]], set()).add((t["turn"] == 0, t["scores_shared"]))
        if t["turn"] == 0 and run_name[t["run_id"]].startswith("kvzip"):  # a reuse counts the shared seconds
            assert t["method_costs"]["score_prefill_s"] > 0 and t["compress_s"] >= t["method_costs"]["score_prefill_s"]
    store.close()
    assert got == {name: {(True, n), (False, 1)} for name, (_, n) in SCORE_SWEEP.items()}
    store = Store(str(tmp_path / "separate.sqlite"))
    assert {t["scores_shared"] for t in store.turns()} == {1}
    store.close()


def test_score_memo_shares_keys_of_two_or_more_runs():
    import torch

    from scbench.engines.score_memo import ScoreMemo

    memo = ScoreMemo([("a", 1), ("a", 1), ("b",), None, ("a", 1)], torch.device("cpu"))
    assert memo.planned == {("a", 1): 3} and memo.sharers(("a", 1)) == 3 and memo.sharers(("b",)) == 1
    assert memo.sharers(None) == 1
    n = []

    def compute():
        n.append(1)
        return {"s": [torch.ones(3)]}, 7

    first, secs = memo.get((("a", 1), 0), compute)
    first[0]["s"][0][0] = 5.0  # a method changing its own scores in place does not reach the others' copies
    again, reused = memo.get((("a", 1), 0), compute)
    assert len(n) == 1 and secs == 0.0 and reused > 0.0 and again[0]["s"][0].tolist() == [1.0, 1.0, 1.0]
    assert again[1] == 7 and memo.take_reused_s() == reused and memo.take_reused_s() == 0.0
    memo.get((("b",), 0), compute)
    memo.get((("b",), 0), compute)
    assert len(n) == 3 and (("b",), 0) not in memo.entries  # a key of one run is never kept
    memo.done(("a", 1))
    memo.done(("a", 1))
    assert (("a", 1), 0) in memo.entries
    memo.done(("a", 1))  # its last run compressed: the copy goes
    assert not memo.entries
    memo.get((("a", 1), 0), compute)  # past its runs: computed, not kept
    assert len(n) == 4 and not memo.entries
    assert ScoreMemo([("a", 1), ("a", 1)], torch.device("cpu"), enabled=False).planned == {}  # SCBENCH_SHARE_SCORES=0


def test_ungroupable_runs_run_alone(tiny_engine, tmp_path):
    jobs = [Job(spec({"name": "full"}, "multi_request"), str(tmp_path / "a.sqlite"), progress=False),
            Job(spec({"name": "ashape", "n_init": 8, "n_local": 56}, "multi_request"), str(tmp_path / "a.sqlite"),
                progress=False),
            Job(spec({"name": "snapkv", "budget": 96, "window": 8}, "multi_request", reuse=False),
                str(tmp_path / "a.sqlite"), progress=False)]
    assert [len(g) for g in plan_groups(jobs)] == [1, 1, 1]


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_own_prefill_runs_decode_with_the_group(tiny_engine, tmp_path, mode):
    import dataclasses

    cfgs = [METHOD_CFGS["full"], METHOD_CFGS["snapkv"], *RIDERS]
    jobs = [Job(spec(cfg, mode), str(tmp_path / "grouped.sqlite"), progress=False, timing="batched") for cfg in cfgs]
    assert [len(g) for g in plan_groups(jobs)] == [len(jobs)]
    assert [len(g) for g in plan_groups([dataclasses.replace(j, timing="sequential") for j in jobs])] == [2, 1, 1, 1, 1]
    outcomes = run_jobs(jobs, engine=tiny_engine)
    assert [o.error for o in outcomes] == [None] * len(jobs) and [o.shared for o in outcomes] == [2, 2, 1, 1, 1, 1]
    for job in jobs:
        run_spec(job.spec, str(tmp_path / "separate.sqlite"), engine=tiny_engine, progress=False, timing="batched")
    grouped, shared, _ = rows(tmp_path / "grouped.sqlite")
    separate, _, _ = rows(tmp_path / "separate.sqlite")
    assert grouped == separate
    store = Store(str(tmp_path / "grouped.sqlite"))
    turns = {t["run_id"]: t for t in store.turns() if t["turn"] == 0}
    labels = {r["run_id"]: r["method"] for r in store.runs()}
    store.close()
    assert {labels[r]: t["prefill_shared"] for r, t in turns.items()} == {
        "full": 2, "snapkv": 2, "ashape": 1, "trishape": 1, "vertical_slash": 1, "cacheblend": 1}
    assert {t["decode_runs"] for t in turns.values()} == {len(jobs)}  # every run's turns in one batch per example


@pytest.mark.parametrize("timing", ["sequential", "batched"])
def test_kill_mid_group_then_resume(tiny_engine, tmp_path, monkeypatch, timing):
    db = str(tmp_path / "kill.sqlite")
    cfgs = [METHOD_CFGS[n] for n in ("full", "snapkv", "streamingllm")]
    jobs = [Job(spec(cfg, "multi_turn"), db, progress=False, timing=timing) for cfg in cfgs]
    ref_jobs = [Job(spec(cfg, "multi_turn"), str(tmp_path / "ref.sqlite"), progress=False, timing=timing)
                for cfg in cfgs]
    run_jobs(ref_jobs, engine=tiny_engine)
    real_put, calls = Store.put, []

    def put(self, run_id, result):  # killed after 7 of 18 turns: inside example 1, in the middle of the 2nd run
        if len(calls) == 7:
            raise KeyboardInterrupt
        calls.append((run_id, result.example_id, result.turn))
        real_put(self, run_id, result)

    monkeypatch.setattr(Store, "put", put)
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, engine=tiny_engine)
    monkeypatch.setattr(Store, "put", real_put)
    store = Store(db)
    before = {(t["run_id"], t["example_id"], t["turn"]): t["created"] for t in store.turns()}
    assert len(before) == 7 and {r["status"] for r in store.runs()} == {"interrupted"}
    store.close()
    run_jobs(jobs, engine=tiny_engine)
    got, _, runs = rows(db)
    ref, _, _ = rows(tmp_path / "ref.sqlite")
    assert got == ref and {s for s, _ in runs.values()} == {"done"}
    store = Store(db)
    after = {(t["run_id"], t["example_id"], t["turn"]): t["created"] for t in store.turns()}
    store.close()
    assert all(after[k] == v for k, v in before.items())  # finished turns were not recomputed


@pytest.mark.parametrize("share", ["true", "false"])
def test_cli_sweep_groups_by_default(tiny_folder, tmp_path, share):
    from scbench.cli import main

    db = tmp_path / "cli.sqlite"
    main(["run", "-m", "method=full,streamingllm-1k,ashape", "mode=multi_request", f"share_prefill={share}",
          "model=smollm2-135m", f"model.path={tiny_folder}", "model.name=tiny", "model.device=cpu",
          "model.dtype=float32",
          "model.window=4096", f"store={db}", "data.n=1", "data.length=200", "data.turns=2", "max_new_tokens=2",
          "progress=false", f"hydra.sweep.dir={tmp_path}/hydra"])
    store = Store(db)
    by_method = {}
    for r in store.runs():
        assert r["status"] == "done"
        by_method[r["method"]] = {t["turn"]: t["prefill_shared"] for t in store.turns(r["run_id"])}
    store.close()
    n = 2 if share == "true" else 1
    assert by_method == {"full": {0: n, 1: 1}, "streamingllm": {0: n, 1: 1}, "ashape": {0: 1, 1: 1}}


def test_fork_plan_from_free_memory():
    import torch

    import scbench.engines.fork
    from scbench.engines.fork import GIB, plan_copy, plan_for

    cuda = torch.device("cuda")
    assert plan_copy(16 * GIB, cuda, device_free=40 * GIB, host_free=100 * GIB) == "device"
    assert plan_copy(16 * GIB, cuda, device_free=20 * GIB, host_free=100 * GIB) == "host"
    assert plan_copy(16 * GIB, cuda, device_free=20 * GIB, host_free=10 * GIB) == "none"
    assert plan_copy(GIB, torch.device("cpu"), host_free=4 * GIB) == "device"
    assert plan_copy(8 * GIB, torch.device("cpu"), host_free=4 * GIB) == "none"
    split = {torch.device("cuda", 0): 8 * GIB, torch.device("cuda", 1): 8 * GIB}  # a model over two devices
    fits = {torch.device("cuda", 0): 40 * GIB, torch.device("cuda", 1): 11 * GIB}
    monkey = pytest.MonkeyPatch()
    monkey.setattr(scbench.engines.fork, "free_device_bytes", lambda d: fits[d])
    monkey.setattr(scbench.engines.fork, "free_host_bytes", lambda: 100 * GIB)
    try:
        assert plan_for(split) == "host"  # device 1 cannot hold its part twice
        fits[torch.device("cuda", 1)] = 40 * GIB
        assert plan_for(split) == "device"
    finally:
        monkey.undo()


def test_free_host_bytes_without_proc_meminfo(monkeypatch, tmp_path):
    """Where /proc/meminfo cannot be read (macOS), host memory comes from psutil, else counts as none."""
    import sys

    import scbench.engines.fork
    from scbench.engines.fork import free_host_bytes

    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(scbench.engines.fork, "MEMINFO", str(tmp_path / "missing"))
    assert abs(free_host_bytes() - psutil.virtual_memory().available) < 2**30
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed
    assert free_host_bytes() == 0


@pytest.mark.parametrize("plan", ["host", "none"])
def test_no_room_for_the_copy_changes_nothing_stored(tiny_engine, tmp_path, monkeypatch, caplog, plan):
    """Without room for a device copy the prefill waits in host memory; without any room each run prefills alone
    (and a warning says so): the rows are the same either way."""
    import scbench.engines.fork

    cfgs = [METHOD_CFGS[n] for n in ("full", "snapkv", "kivi")]
    ref = [Job(spec(cfg, "multi_request"), str(tmp_path / "ref.sqlite"), progress=False) for cfg in cfgs]
    run_jobs(ref, engine=tiny_engine)
    monkeypatch.setattr(scbench.engines.fork, "plan_copy", lambda *a, **k: plan)
    jobs = [Job(spec(cfg, "multi_request"), str(tmp_path / "low.sqlite"), progress=False) for cfg in cfgs]
    with caplog.at_level("WARNING"):
        run_jobs(jobs, engine=tiny_engine)
    assert "prefill alone" in caplog.text if plan == "none" else "host memory" in caplog.text
    got, shared, _ = rows(tmp_path / "low.sqlite")
    want, _, _ = rows(tmp_path / "ref.sqlite")
    assert got == want
    assert {v for k, v in shared.items() if k[2] == 0} == ({1} if plan == "none" else {3})


def test_grouped_runs_warm_up_like_separate_runs(tiny_engine, tmp_path, monkeypatch):
    """Each grouped run warms up before its first timed turn and charges it there, as run_spec does."""
    calls = []
    monkeypatch.setattr(tiny_engine, "warmup", lambda method: calls.append(method.name) or 1.5, raising=False)
    cfgs = [METHOD_CFGS[n] for n in ("full", "snapkv")]
    jobs = [Job(spec(cfg, "multi_request"), str(tmp_path / "g.sqlite"), progress=False) for cfg in cfgs]
    run_jobs(jobs, engine=tiny_engine)
    assert calls == ["full", "snapkv"]
    for job in jobs:
        run_spec(job.spec, str(tmp_path / "s.sqlite"), engine=tiny_engine, progress=False)
    grouped, _, _ = rows(tmp_path / "g.sqlite")
    separate, _, _ = rows(tmp_path / "s.sqlite")
    assert grouped == separate
    assert sorted(r["warmup_s"] for r in grouped.values()) == [0.0] * 10 + [1.5, 1.5]  # 2 runs x 2 examples x 3 turns
