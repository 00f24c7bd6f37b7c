"""The processes an engine spawns (vLLM's engine core and workers): found, measured, and never left behind.

``ChildProcesses`` notes this process's descendants when created; the ones that appear afterwards are the
engine's. It runs the engine's ``close`` at interpreter exit and turns SIGTERM into a clean exit (so ``close`` runs),
makes Ctrl-C end a start that would otherwise swallow it (``interruptible_start``), and terminates, then kills,
whatever the engine's own shutdown leaves (``reap``).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time
from typing import Callable

from scbench.devices import peak_rss, reset_peak_rss


def descendants() -> set:
    """This process's descendants (``psutil.Process``, which tell a reused pid apart), less multiprocessing's
    resource tracker (it exits with us)."""
    import psutil

    procs = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(p.cmdline()):
                procs.add(p)
        except psutil.Error:
            pass
    return procs


def reap(procs: set, timeout: float = 10.0) -> None:
    """Terminate (then kill) the given ``psutil.Process`` es that are still alive."""
    import psutil

    procs = [p for p in procs if p.is_running()]
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


class ChildProcesses:
    """The processes started after this object was made; ``close`` runs at exit and on SIGTERM until ``release``."""

    def __init__(self, close: Callable[[], None]):
        self.before = descendants()
        self.spawned: set = set()
        """The processes the engine started (``psutil.Process``), set by ``started``."""
        self._close = close
        self._previous_sigterm = None
        atexit.register(close)
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGTERM)
            if previous in (signal.SIG_DFL, None):  # SIGTERM would end us without atexit: exit cleanly instead
                self._previous_sigterm = previous
                signal.signal(signal.SIGTERM, exit_on_sigterm)

    def new(self) -> set:
        """Descendants that appeared since this object was made."""
        return descendants() - self.before

    def started(self) -> None:
        """The engine is up: remember the processes it started."""
        self.spawned = self.new()

    @contextlib.contextmanager
    def interruptible_start(self):
        """vLLM swallows a KeyboardInterrupt during its engine handshake (``zmq_socket_ctx``) and then waits up to
        VLLM_ENGINE_READY_TIMEOUT_S for an engine that never answers. While it starts, Ctrl-C therefore ends the
        processes started so far and raises KeyboardInterrupt, re-sent every second until one gets out."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        starting = threading.Event()
        starting.set()

        def resend():
            while True:
                time.sleep(1)
                if not starting.is_set():
                    return
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        def on_sigint(signum, frame):
            reap(self.new(), timeout=5.0)
            if not any(t.name == "scbench-vllm-interrupt" for t in threading.enumerate()):
                threading.Thread(target=resend, name="scbench-vllm-interrupt", daemon=True).start()
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            starting.clear()
            signal.signal(signal.SIGINT, previous)

    def reap(self) -> None:
        """Terminate, then kill, the engine's processes that are still alive."""
        reap(self.spawned or self.new())

    def release(self) -> None:
        """Undo the exit hooks (after ``close``)."""
        atexit.unregister(self._close)
        if self._previous_sigterm is not None and signal.getsignal(signal.SIGTERM) is exit_on_sigterm:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    def peak_memory(self) -> int | None:
        """The largest peak RSS among this process and the spawned ones since ``reset_peak_memory`` (None when none
        can be read)."""
        peaks = [peak_rss(pid) for pid in [os.getpid(), *(p.pid for p in self.spawned)]]
        return max((p for p in peaks if p), default=None)

    def reset_peak_memory(self) -> None:
        """Restart the peak RSS of this process and the spawned ones at their current size
        (``devices.reset_peak_rss``)."""
        for pid in [os.getpid(), *(p.pid for p in self.spawned)]:
            reset_peak_rss(pid)
