"""Peak memory is each run's own: a sweep's runs share one process (and its model), so the peak a run records counts
from its start (``devices.start_peak``), not from an earlier, heavier run's. CPU: the process's peak RSS (Linux
``VmHWM``, restarted through ``/proc/self/clear_refs``); CUDA uses torch's peak counter the same way."""
from __future__ import annotations

import pytest
import torch

from scbench import devices
from scbench.group import Job, run_jobs
from scbench.run import run_spec
from scbench.store import Store
from support import SWEEP_CFGS, sweep_spec

MiB = 2**20
HEAVY = 768 * MiB
"""What the "earlier run" holds for a moment: far more than the tiny model's runs ever need."""

pytestmark = pytest.mark.skipif(devices.peak_rss() is None or not devices.reset_peak_rss(),
                                reason="needs Linux /proc (VmHWM, clear_refs)")


def heavy_moment() -> int:
    """Touch and free ``HEAVY`` bytes, as an earlier run's big cache would; the process's peak RSS after it."""
    x = torch.ones(HEAVY // 4)
    del x
    return devices.peak_rss()


def run_peaks(db) -> dict[str, int]:
    """Method name -> the largest ``peak_mem_bytes`` its turns recorded."""
    store = Store(str(db))
    try:
        names = {r["run_id"]: r["method"] for r in store.runs()}
        peaks: dict[str, int] = {}
        for t in store.turns():
            name = names[t["run_id"]]
            peaks[name] = max(peaks.get(name, 0), t["peak_mem_bytes"])
        return peaks
    finally:
        store.close()


def test_peak_rss_restarts_at_the_current_size():
    devices.reset_peak_rss()
    start = devices.peak_rss()
    high = heavy_moment()
    assert high >= start + HEAVY * 0.9
    devices.start_peak()  # no devices: this process's RSS only
    assert devices.peak_rss() < high - HEAVY * 0.5


@pytest.mark.parametrize("reset", [True, False])
def test_a_runs_peak_memory_is_its_own_not_an_earlier_runs(tiny_engine, tmp_path, monkeypatch, reset):
    """Run B after a heavy moment of the same process: it records its own peak; without the reset (the behaviour
    before) it records the heavy moment's, which is what this test tells apart."""
    if not reset:
        monkeypatch.setattr(type(tiny_engine), "reset_peak_memory", lambda self: None)
    db = tmp_path / "runs.sqlite"
    high = heavy_moment()
    run_spec(sweep_spec(SWEEP_CFGS["snapkv"], "multi_turn"), str(db), engine=tiny_engine, progress=False)
    peak = run_peaks(db)["snapkv"]
    if reset:
        assert 0 < peak < high - HEAVY * 0.5
    else:
        assert peak >= high


def test_a_grouped_sweeps_runs_record_the_groups_peak_not_an_earlier_runs(tiny_engine, tmp_path):
    jobs = [Job(sweep_spec(SWEEP_CFGS[name], "multi_turn"), str(tmp_path / "grouped.sqlite"), progress=False)
            for name in ("snapkv", "streamingllm")]
    high = heavy_moment()
    outcomes = run_jobs(jobs, engine=tiny_engine)
    assert [o.error for o in outcomes] == [None, None] and all(o.shared == 2 for o in outcomes)
    peaks = run_peaks(tmp_path / "grouped.sqlite")
    assert set(peaks) == {"snapkv", "streamingllm"}
    assert all(0 < p < high - HEAVY * 0.5 for p in peaks.values())
