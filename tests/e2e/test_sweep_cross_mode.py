"""Grouped sweeps across modes (scbench/group.py, scbench/group_example.py): with the first query hidden from
compression (``policy.query_visible=false``) multi-turn and multi-request first feed the same context, so one group
holds both modes and forks one prefill per example; where an example's two first feeds differ each mode prefills
apart; a kill inside such a group loses nothing finished."""
from __future__ import annotations

import pytest

from scbench.group import Job, plan_groups, run_jobs
from scbench.records import RunSpec
from scbench.run import run_spec
from scbench.store import Store
from support import SWEEP_CFGS as METHOD_CFGS, SWEEP_RIDERS as RIDERS, first_turns
from support import sweep_rows as rows, sweep_spec as spec


def test_modes_group_only_when_the_query_is_hidden():
    """Multi-turn first feeds its whole first prompt (the query is visible to compression, the reference) while
    multi-request first feeds the context alone: two groups. With the query hidden both first feed the context."""
    both = lambda **kw: [Job(spec(METHOD_CFGS[n], mode, **kw), "s.sqlite")  # noqa: E731
                         for mode in ("multi_turn", "multi_request") for n in ("full", "snapkv")]
    assert [len(g) for g in plan_groups(both())] == [2, 2]
    assert [len(g) for g in plan_groups(both(query_visible=False))] == [4]


def test_first_feed_ids_match_what_each_mode_feeds(tiny_engine):
    """``runner.first_feed_ids`` vs the tokens the session's first feed receives, both modes and both policies."""
    from scbench.data import load_examples
    from scbench.registry import METHODS, TASKS
    from scbench.runner import Replay, first_feed_ids

    task = TASKS.get("scbench_kv")
    for visible in (True, False):
        s = spec({"name": "full"}, "multi_turn", query_visible=visible)
        ex = task.prepare_examples(load_examples(task, "generated", n=1, length=300, turns=3, seed=0,
                                                 count=lambda t: len(tiny_engine.encode(t, add_special_tokens=False))),
                                   3)[0]
        got = {}
        for mode in ("multi_turn", "multi_request"):
            sm = RunSpec(**{**s.__dict__, "mode": mode})
            fed = []

            class Spy:
                def __getattr__(self, name):
                    return getattr(tiny_engine, name)

                def session(self, method):
                    sess = tiny_engine.session(method)
                    real = sess.feed

                    def feed(ids, **kw):
                        fed.append(list(ids))
                        return real(ids, **kw)

                    sess.feed = feed
                    return sess

            for _ in Replay(Spy(), METHODS.get("full")(), task, ex, sm):
                break
            got[mode] = fed[0]
            assert first_feed_ids(tiny_engine, task, ex, sm) == fed[0]
        assert (got["multi_turn"] == got["multi_request"]) is (not visible)


@pytest.mark.parametrize("timing", ["sequential", "batched"])
def test_both_modes_share_one_prefill(tiny_engine, tmp_path, timing):
    """query_visible=false: every method of both modes forks one first prefill per example; rows as separate runs."""
    jobs = [Job(spec(cfg, mode, query_visible=False), str(tmp_path / "grouped.sqlite"), progress=False, timing=timing)
            for mode in ("multi_turn", "multi_request") for cfg in METHOD_CFGS.values()]
    assert len(plan_groups(jobs)) == 1
    outcomes = run_jobs(jobs, engine=tiny_engine)
    assert [o.error for o in outcomes] == [None] * len(jobs)
    for job in jobs:
        run_spec(job.spec, str(tmp_path / "separate.sqlite"), engine=tiny_engine, progress=False, timing=timing)
    grouped, shared, g_runs = rows(tmp_path / "grouped.sqlite")
    separate, _, s_runs = rows(tmp_path / "separate.sqlite")
    assert g_runs == s_runs and grouped == separate
    assert {v for k, v in shared.items() if k[2] == 0} == {len(jobs)}  # one prefill for all 2 x 10 runs


def test_sparse_prefill_runs_share_their_own_prefill_across_modes(tiny_engine, tmp_path, monkeypatch):
    """query_visible=false, timing=batched: one sparse-prefill method config in both modes computes its own sparse
    prefill once per example and forks it (``own_prefill_key``), CacheBlend still prefills alone; the rows (every
    cost column but the timings, the attention cells computed and vertical-slash's per-prefill counter included)
    are those of separate runs."""
    from scbench.methods.vertical_slash import VerticalSlash

    real = VerticalSlash.prefill_attention

    def counted(self, layer_idx, q, k, v, scale):  # the GPU path's per-prefill counter, on the CPU
        st = self.__dict__.setdefault("gpu_stats", {"layers_seen": 0, "fallbacks": 0, "density_sum": 0.0})
        st["fallbacks"] += 1
        return real(self, layer_idx, q, k, v, scale)

    monkeypatch.setattr(VerticalSlash, "prefill_attention", counted)
    cfgs = [METHOD_CFGS["full"], METHOD_CFGS["snapkv"], *RIDERS]
    jobs = [Job(spec(cfg, mode, query_visible=False), str(tmp_path / "g.sqlite"), progress=False, timing="batched")
            for mode in ("multi_turn", "multi_request") for cfg in cfgs]
    assert [len(g) for g in plan_groups(jobs)] == [len(jobs)]
    outcomes = run_jobs(jobs, engine=tiny_engine)
    assert [o.error for o in outcomes] == [None] * len(jobs)
    assert [o.shared for o in outcomes] == [4, 4, 2, 2, 2, 1] * 2
    for job in jobs:
        run_spec(job.spec, str(tmp_path / "s.sqlite"), engine=tiny_engine, progress=False, timing="batched")
    grouped, shared, _ = rows(tmp_path / "g.sqlite")
    separate, _, _ = rows(tmp_path / "s.sqlite")
    assert grouped == separate
    first = first_turns(tmp_path / "g.sqlite", by_mode=True)
    got = {key: t["prefill_shared"] for (key, _), t in first.items()}
    assert got == {(name, mode): n for mode in ("multi_turn", "multi_request") for name, n in
                   (("full", 4), ("snapkv", 4), ("ashape", 2), ("trishape", 2), ("vertical_slash", 2),
                    ("cacheblend", 1))}
    fallbacks = {t["method_costs"]["prefill_fallbacks"] for (key, _), t in first.items() if key[0] == "vertical_slash"}
    assert fallbacks and 0 not in fallbacks  # every run's first turn has the counter, forks included


def test_context_truncation_lets_truncated_modes_share_one_prefill(tiny_engine, tmp_path):
    """At a window that truncates (SCBench's 128K), the reference cuts each mode's first prompt to its own budget
    (multi-request 1,000 tokens shorter), so the modes' first feeds differ even with the query hidden: one prefill
    per mode. ``policy.truncation=context`` cuts the context alone to one length in both modes: one prefill for
    both, the sparse-prefill runs' own one too, and the rows are those of separate runs."""
    from scbench.data import load_examples
    from scbench.prompts import PromptBuilder
    from scbench.registry import TASKS

    task, probe = TASKS.get("scbench_kv"), spec(METHOD_CFGS["full"], "multi_request")
    count = lambda t: len(tiny_engine.encode(t, add_special_tokens=False))  # noqa: E731
    examples = task.prepare_examples(load_examples(task, "generated", count=count, **probe.data), probe.max_turns)
    budgets = [PromptBuilder(tiny_engine, task, ex, mode="multi_request", n_turns=3, max_seq_length=probe.max_seq_length,
                             max_new_tokens_cap=probe.max_new_tokens) for ex in examples]
    window = min(probe.max_seq_length, tiny_engine.window)
    limit = window - max(b.budget - len(b.context()) for b in budgets) - 40  # every context cut
    cfgs = [METHOD_CFGS["full"], METHOD_CFGS["snapkv"], RIDERS[0]]
    got = {}
    for rule in ("reference", "context"):
        db = str(tmp_path / f"{rule}.sqlite")
        jobs = [Job(spec(cfg, mode, query_visible=False, truncation=rule, max_seq_length=limit), db, progress=False,
                    timing="batched") for mode in ("multi_turn", "multi_request") for cfg in cfgs]
        assert [o.error for o in run_jobs(jobs, engine=tiny_engine)] == [None] * len(jobs)
        got[rule] = {key: t["prefill_shared"] for key, t in first_turns(db).items()}
        if rule == "context":
            for job in jobs:
                run_spec(job.spec, str(tmp_path / "separate.sqlite"), engine=tiny_engine, progress=False, timing="batched")
            assert rows(db)[0] == rows(tmp_path / "separate.sqlite")[0]
    assert set(got["reference"].values()) == {2, 1}  # per mode: full and SnapKV; A-shape alone
    assert {m: n for (m, _), n in got["context"].items()} == {"full": 4, "snapkv": 4, "ashape": 2}


def test_modes_whose_first_feeds_differ_prefill_apart(tiny_engine, tmp_path, monkeypatch):
    """An example whose two modes first feed other tokens (e.g. truncated differently: multi-request keeps a margin)
    gets one prefill per mode; the rows are those of separate runs."""
    import scbench.runner

    real = scbench.runner.first_feed_ids

    def differ(engine, task, example, s):  # as if multi-request's context were truncated
        ids = real(engine, task, example, s)
        return ids[:-1] if s.mode == "multi_request" else ids

    monkeypatch.setattr(scbench.runner, "first_feed_ids", differ)
    cfgs = [METHOD_CFGS[n] for n in ("full", "snapkv", "kivi")]
    jobs = [Job(spec(cfg, mode, query_visible=False), str(tmp_path / "g.sqlite"), progress=False)
            for mode in ("multi_turn", "multi_request") for cfg in cfgs]
    run_jobs(jobs, engine=tiny_engine)
    for job in jobs:
        run_spec(job.spec, str(tmp_path / "s.sqlite"), engine=tiny_engine, progress=False)
    grouped, shared, _ = rows(tmp_path / "g.sqlite")
    separate, _, _ = rows(tmp_path / "s.sqlite")
    assert grouped == separate
    assert {v for k, v in shared.items() if k[2] == 0} == {3}  # per mode


def test_kill_mid_cross_mode_group_then_resume(tiny_engine, tmp_path, monkeypatch):
    """A kill inside a group holding both modes loses no finished turn; the re-launch completes every run."""
    db = str(tmp_path / "kill.sqlite")
    cfgs = [METHOD_CFGS[n] for n in ("full", "snapkv", "streamingllm")]
    mk = lambda path: [Job(spec(cfg, mode, query_visible=False), path, progress=False)  # noqa: E731
                       for mode in ("multi_turn", "multi_request") for cfg in cfgs]
    run_jobs(mk(str(tmp_path / "ref.sqlite")), engine=tiny_engine)
    real_put, calls = Store.put, []

    def put(self, run_id, result):  # killed after 13 of 36 turns: inside example 0, in a multi-request run
        if len(calls) == 13:
            raise KeyboardInterrupt
        calls.append((run_id, result.example_id, result.turn))
        real_put(self, run_id, result)

    monkeypatch.setattr(Store, "put", put)
    with pytest.raises(KeyboardInterrupt):
        run_jobs(mk(db), engine=tiny_engine)
    monkeypatch.setattr(Store, "put", real_put)
    store = Store(db)
    before = {(t["run_id"], t["example_id"], t["turn"]): t["created"] for t in store.turns()}
    assert len(before) == 13 and {r["status"] for r in store.runs()} == {"interrupted"}
    store.close()
    run_jobs(mk(db), engine=tiny_engine)
    got, _, runs = rows(db)
    ref, _, _ = rows(tmp_path / "ref.sqlite")
    assert got == ref and len(runs) == 6 and {s for s, _ in runs.values()} == {"done"}
    store = Store(db)
    after = {(t["run_id"], t["example_id"], t["turn"]): t["created"] for t in store.turns()}
    store.close()
    assert all(after[k] == v for k, v in before.items())


def test_sharers_prepare_longest_query_window_first_and_each_config_together():
    """A cross-mode class's sharers: H2O (every prompt query) first, so the 34 GB of captured queries at 131K are cut
    once both its runs compressed; then SnapKV's window; then the rest; each method config's runs side by side in the
    sweep's mode order; the riders after, as before."""
    from types import SimpleNamespace

    from scbench.group_example import Member, prefill_plan
    from scbench.run import build_method

    names = ["full", "snapkv", "h2o", "ashape"]
    members = [Member(job=SimpleNamespace(spec=spec(cfg, mode)), run_id=f"{mode}-{name}", spec_dict={},
                      method=build_method(cfg))
               for mode in ("multi_turn", "multi_request")
               for name, cfg in zip(names, [METHOD_CFGS["full"], METHOD_CFGS["snapkv"], METHOD_CFGS["h2o"], RIDERS[0]])]
    takers, riders, own = prefill_plan(members)
    assert [m.run_id for m in takers] == ["multi_turn-h2o", "multi_request-h2o", "multi_turn-snapkv",
                                          "multi_request-snapkv", "multi_turn-full", "multi_request-full"]
    assert [m.run_id for m in riders] == ["multi_turn-ashape", "multi_request-ashape"] and len(own) == 1
