"""Memory in grouped sweeps (scbench/group.py): a run's preparation that runs out of memory next to the prepared
batches has those decoded first and is prepared again, alone, storing the rows a separate run stores; the room check
sizes by a cache and the most passing work a preparation has needed; the peak memory runs record survives the peak
windows."""
from __future__ import annotations

import logging
import time

import pytest
import torch

from scbench.batch import BatchedReplay
from scbench.group import Job, run_jobs
from scbench.run import run_spec
from scbench.store import Store
from support import SWEEP_CFGS as METHOD_CFGS, SWEEP_RIDERS as RIDERS, first_turns
from support import sweep_rows as rows, sweep_spec as spec

LOST = 0.05
"""Seconds a failed preparation takes before it runs out of memory (recorded as the run's ``retry_s``)."""


def assert_rows_of_separate_runs(jobs, tmp_path, engine) -> None:
    """The grouped store (``grouped.sqlite``) holds the rows each job stores run alone, every run done."""
    for job in jobs:
        run_spec(job.spec, str(tmp_path / "separate.sqlite"), engine=engine, progress=False, timing="batched")
    grouped, _, runs = rows(tmp_path / "grouped.sqlite")
    separate, _, _ = rows(tmp_path / "separate.sqlite")
    assert grouped == separate and {s for s, _ in runs.values()} == {"done"}


@pytest.mark.parametrize("mode", ["multi_turn", "multi_request"])
def test_out_of_memory_preparation_is_retried_alone(tiny_engine, tmp_path, monkeypatch, caplog, mode):
    """SnapKV runs out of memory after it took its fork of the shared prefill, A-shape before it prefilled: each is
    prepared again after the batches so far are decoded, and every run stores the rows of its separate run.
    (PyramidKV goes first: the sharers prepare longest query window first, then in the sweep's order.)"""
    cfgs = [METHOD_CFGS["pyramidkv"], RIDERS[0], METHOD_CFGS["snapkv"], METHOD_CFGS["streamingllm"], RIDERS[1]]
    jobs = [Job(spec(cfg, mode), str(tmp_path / "grouped.sqlite"), progress=False, timing="batched") for cfg in cfgs]
    real, failed = BatchedReplay.prepare, []

    def prepare(self):
        name = self.method.name
        if name == "ashape" and (name, self.example.id) not in failed:
            failed.append((name, self.example.id))
            time.sleep(LOST)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.46 GiB")
        out = real(self)
        if name == "snapkv" and (name, self.example.id) not in failed:
            failed.append((name, self.example.id))
            time.sleep(LOST)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.46 GiB")
        return out

    monkeypatch.setattr(BatchedReplay, "prepare", prepare)
    with caplog.at_level(logging.WARNING, logger="scbench.group"):
        outcomes = run_jobs(jobs, engine=tiny_engine)
    assert [o.error for o in outcomes] == [None] * len(jobs)
    assert len(failed) == 4  # two runs x two examples
    assert sum("no memory to prepare" in r.getMessage() for r in caplog.records) == 4
    monkeypatch.setattr(BatchedReplay, "prepare", real)
    assert_rows_of_separate_runs(jobs, tmp_path, tiny_engine)
    first = first_turns(tmp_path / "grouped.sqlite")
    store = Store(str(tmp_path / "grouped.sqlite"))
    later = [t for t in store.turns() if t["turn"] > 0]
    store.close()
    # each failed attempt's time is on the run's first row of that example, nowhere else
    retried = {key for key, t in first.items() if t["retry_s"] > 0}
    assert retried == {(m, ex) for m, ex in first if m in ("snapkv", "ashape")}
    assert all(first[key]["retry_s"] >= LOST for key in retried) and {t["retry_s"] for t in later} == {0.0}
    for ex in {e for _, e in first}:
        # the fork SnapKV took is gone with its failed attempt: it prefilled alone; StreamingLLM still forked
        assert {m: first[m, ex]["prefill_shared"] for m in ("pyramidkv", "snapkv", "streamingllm")} == {
            "pyramidkv": 3, "snapkv": 1, "streamingllm": 3}
        # PyramidKV decoded alone before SnapKV's retry; SnapKV and StreamingLLM together before A-shape's retry; the
        # riders (prepared after every run that forks) together
        assert {m: first[m, ex]["decode_runs"] for m in ("pyramidkv", "snapkv", "streamingllm", "ashape", "trishape")} == {
            "pyramidkv": 1, "snapkv": 2, "streamingllm": 2, "ashape": 2, "trishape": 2}


def test_failed_combined_decode_is_redone_run_by_run(tiny_engine, tmp_path, monkeypatch):
    """A decode of several runs' batches that fails is redone one run at a time: the rows are a separate run's, and
    the failed attempt's time is split among those runs' first rows of the example (``retry_s``)."""
    import scbench.batch

    cfgs = [METHOD_CFGS["full"], METHOD_CFGS["snapkv"], METHOD_CFGS["streamingllm"]]
    jobs = [Job(spec(cfg, "multi_request"), str(tmp_path / "grouped.sqlite"), progress=False, timing="batched")
            for cfg in cfgs]
    real, failed = scbench.batch.decode_parts, []

    def decode_parts(engine, parts):
        if len(parts) > 1:
            failed.append(len(parts))
            time.sleep(LOST)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(engine, parts)

    monkeypatch.setattr(scbench.batch, "decode_parts", decode_parts)
    outcomes = run_jobs(jobs, engine=tiny_engine)
    assert [o.error for o in outcomes] == [None] * len(jobs) and failed == [3, 3]  # once per example
    monkeypatch.setattr(scbench.batch, "decode_parts", real)
    assert_rows_of_separate_runs(jobs, tmp_path, tiny_engine)
    store = Store(str(tmp_path / "grouped.sqlite"))
    turns = store.turns()
    store.close()
    assert {t["decode_runs"] for t in turns} == {1}
    assert all(t["retry_s"] >= LOST / 3 for t in turns if t["turn"] == 0)
    assert {t["retry_s"] for t in turns if t["turn"] > 0} == {0.0}


def test_out_of_memory_twice_is_prepared_after_the_others(tiny_engine, tmp_path, monkeypatch, caplog):
    """SnapKV runs out of memory next to the prepared batches and again in its retry (the shared prefill's copy and
    the captured queries still held for later runs, as at 131K on the H200): it is prepared once more after the
    example's other runs, with the shared copy freed, and stores the rows of its separate run; both failed attempts'
    seconds are on its first row of the example. (PyramidKV, with SnapKV's query window, prepares first.)"""
    cfgs = [METHOD_CFGS["pyramidkv"], METHOD_CFGS["snapkv"], METHOD_CFGS["streamingllm"], RIDERS[0]]
    jobs = [Job(spec(cfg, "multi_request"), str(tmp_path / "grouped.sqlite"), progress=False, timing="batched")
            for cfg in cfgs]
    real, failed = BatchedReplay.prepare, []

    def prepare(self):
        if self.method.name == "snapkv" and failed.count(self.example.id) < 2:
            failed.append(self.example.id)
            time.sleep(LOST)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 260.00 MiB")
        return real(self)

    monkeypatch.setattr(BatchedReplay, "prepare", prepare)
    with caplog.at_level(logging.WARNING, logger="scbench.group_example"):
        outcomes = run_jobs(jobs, engine=tiny_engine)
    assert [o.error for o in outcomes] == [None] * len(jobs) and len(failed) == 4  # twice per example
    assert sum("prepared again by itself after them" in r.getMessage() for r in caplog.records) == 2
    monkeypatch.setattr(BatchedReplay, "prepare", real)
    assert_rows_of_separate_runs(jobs, tmp_path, tiny_engine)
    first = first_turns(tmp_path / "grouped.sqlite")
    for ex in {e for _, e in first}:
        assert first["snapkv", ex]["retry_s"] >= 2 * LOST and first["snapkv", ex]["prefill_shared"] == 1
        assert first["snapkv", ex]["decode_runs"] == 1  # decoded by itself, after the others
        assert {first[m, ex]["retry_s"] for m in ("pyramidkv", "streamingllm", "ashape")} == {0.0}


def test_out_of_memory_with_nothing_prepared_fails_the_run(tiny_engine, tmp_path, monkeypatch):
    """A run out of memory with no prepared batch to decode first is tried once more after the example's other
    runs; out of memory there too, it is the run's failure (recorded); the others go on."""
    cfgs = [METHOD_CFGS["full"], METHOD_CFGS["snapkv"]]
    jobs = [Job(spec(cfg, "multi_request"), str(tmp_path / "g.sqlite"), progress=False, timing="batched")
            for cfg in cfgs]
    real = BatchedReplay.prepare

    def prepare(self):
        if self.method.name == "full":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self)

    monkeypatch.setattr(BatchedReplay, "prepare", prepare)
    outcomes = run_jobs(jobs, engine=tiny_engine)
    assert isinstance(outcomes[0].error, torch.OutOfMemoryError) and outcomes[1].error is None
    store = Store(str(tmp_path / "g.sqlite"))
    status = {r["method"]: r["status"] for r in store.runs()}
    store.close()
    assert status == {"full": "failed", "snapkv": "done"}


def test_room_for_run_sizes_by_the_largest_preparation(monkeypatch):
    import scbench.engines.fork
    from scbench.engines.fork import GIB
    from scbench.group_example import room_for_run

    class Shared:
        fork_bytes = 4 * GIB

    monkeypatch.setattr(scbench.engines.fork, "free_host_bytes", lambda: 20 * GIB)
    cpu = torch.device("cpu")
    assert room_for_run(Shared(), cpu, [], 0)  # a fork, a quarter of it and 2 GiB: 4 + 1 + 2
    assert room_for_run(Shared(), cpu, [], 14 * GIB)  # 4 + 14 + 2
    assert not room_for_run(Shared(), cpu, [], 15 * GIB)  # a prefill's passing work counts


def test_peak_window_keeps_the_process_peak(monkeypatch):
    """``peak_window`` resets torch's peak counter to measure a block; the peak the runs record
    (``sharding.peak_memory_per_device``) still counts what came before (a stand-in CUDA allocator)."""
    import scbench.devices as devices
    from scbench.engines.sharding import peak_memory_per_device

    state = {"now": 10, "peak": 50}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: state["now"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: state.update(peak=state["now"]))
    monkeypatch.setattr(devices, "_PEAK_FLOOR", {})
    cuda = torch.device("cuda", 0)
    with devices.peak_window(cuda) as w:
        state.update(now=30, peak=40)  # 30 bytes at most above the 10 allocated when it began
        state["now"] = 20
    assert w.extra == 30 and w.passing == 20  # 40 at most, 20 of it kept at the end
    assert peak_memory_per_device([cuda]) == {"cuda:0": 50}  # the earlier peak, not the window's 40
    state.update(peak=70)
    assert peak_memory_per_device([cuda]) == {"cuda:0": 70}
    with devices.peak_window(torch.device("cpu")) as w:
        pass
    assert w.extra == w.passing == 0


def test_decoded_runs_free_their_caches_without_the_garbage_collector(tiny_engine, tmp_path, monkeypatch):
    """A run's prepared batch is gone once decoded, by reference counting alone: when the next run of the group
    prepares, no earlier run's batch, cache or cache layer is alive (reference cycles -- a batch plugin's factory
    closing over its batch, Quest's and RetrievalAttention's batched decode holding the batch's KV that holds them --
    kept each decoded cache until the collector ran: at 131K the group's later runs ran out of memory next to them).
    With the collector off, each run is decoded before the next one prepares (room rule forced to say no)."""
    import gc
    import weakref
    from types import SimpleNamespace

    import scbench.group_example as ge
    from scbench.batch import batch_decoder

    cfgs = [METHOD_CFGS[n] for n in ("quest", "kivi", "retrieval_attention", "full", "snapkv")]
    cfgs.append({**METHOD_CFGS["retrieval_attention"], "tier": "device"})
    jobs = [Job(spec(cfg, mode), str(tmp_path / "grouped.sqlite"), progress=False, timing="batched")
            for mode in ("multi_turn", "multi_request") for cfg in cfgs]
    real, made, alive, kinds = BatchedReplay.prepare, [], [], []

    def prepare(self):
        alive.append(sum(r() is not None for r in made))  # earlier runs' batches still alive as this one prepares
        out = real(self)
        if out is not None and out.plugin is not None:
            kinds.append(type(batch_decoder(self.method)).__name__)
        if out is not None:  # the batch, its cache and the cache's layers (Quest's and RetrievalAttention's own)
            for x in (out, out.cache, *getattr(out.cache, "layers", ())):
                if isinstance(x, SimpleNamespace):  # KIVI's laid-out cache and layers: their tensors
                    made.extend(weakref.ref(t) for t in vars(x).values() if isinstance(t, torch.Tensor))
                else:
                    made.append(weakref.ref(x))
        return out

    monkeypatch.setattr(BatchedReplay, "prepare", prepare)
    monkeypatch.setattr(ge, "room_for_run", lambda *a, **k: False)
    monkeypatch.setattr(ge, "free_cached_memory", lambda: None)  # the group's collector call after a decode
    gc.collect()
    gc.disable()
    try:
        outcomes = run_jobs(jobs, engine=tiny_engine)
    finally:
        gc.enable()
    assert [o.error for o in outcomes] == [None] * len(jobs)
    assert set(alive) == {0}, alive
    assert len(made) >= 12 * 3, len(made)  # most runs batch (15 of the 20 on the tiny model)
    assert {"QuestBatch", "KIVIBatch", "RetrievalBatch"} <= set(kinds), kinds
