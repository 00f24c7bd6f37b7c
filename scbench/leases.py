"""Who computes a run: a lease row per (run, shard) naming the owning process (host, pid, process start time)
and a heartbeat, so a second launch skips runs that are being computed and takes over those whose owner is gone.

An owner is alive when it runs on this host and its pid still names the same process (same start time), or,
on another host, when its heartbeat is younger than ``stale_after()`` seconds (``SCBENCH_LEASE_STALE_S``,
default 300). The owning process refreshes the heartbeat every ``HEARTBEAT_S`` seconds from a thread.
"""
from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time

HEARTBEAT_S = 30.0


def stale_after() -> float:
    return float(os.environ.get("SCBENCH_LEASE_STALE_S", 300))


def host() -> str:
    return socket.gethostname()


def process_start(pid: int) -> float | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux /proc), None when unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    try:
        return float(stat[stat.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def me() -> dict:
    pid = os.getpid()
    return {"host": host(), "pid": pid, "pstart": process_start(pid)}


def alive(lease: dict, now: float | None = None) -> bool:
    """Whether the lease's owner still runs (see the module docstring)."""
    if lease["host"] == host():
        if lease["pid"] == os.getpid():
            return lease.get("pstart") in (None, process_start(os.getpid()))
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        started = process_start(int(lease["pid"]))
        return lease.get("pstart") is None or started is None or started == lease["pstart"]
    return (now or time.time()) - (lease["heartbeat"] or 0) < stale_after()


class Heartbeat:
    """A daemon thread refreshing one lease's heartbeat in its own connection until ``stop()``."""

    def __init__(self, path, run_id: str, shard: str, every: float = HEARTBEAT_S):
        self.path, self.run_id, self.shard, self.every = str(path), run_id, shard, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"scbench-heartbeat-{run_id[:8]}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
                try:
                    db.execute("UPDATE leases SET heartbeat=? WHERE run_id=? AND shard=? AND host=? AND pid=?",
                               (time.time(), self.run_id, self.shard, host(), os.getpid()))
                finally:
                    db.close()
            except sqlite3.Error:  # a busy or failing store: the next beat tries again
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
