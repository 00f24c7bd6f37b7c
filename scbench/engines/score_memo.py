"""The compression scores of one shared prefill, computed once for the runs of a grouped sweep whose methods score
alike (``Method.score_key()``; scbench/engines/fork.py's ``SharedPrefill`` holds one per example)."""
from __future__ import annotations

import os
import time
from collections import Counter

from scbench.devices import sync as _sync
from scbench.engines.recurrent import _clone

SHARE_SCORES = os.environ.get("SCBENCH_SHARE_SCORES", "1") != "0"
"""``SCBENCH_SHARE_SCORES=0``: every run of a group computes its own scores (``ScoreMemo`` keeps nothing; the
predictions are the same either way, this is for timing the difference)."""


class ScoreMemo:
    """The compression scores of one shared prefill, by ``(Method.score_key(), part)`` (scbench/engines/fork.py's
    module docstring).

    Only keys that two or more runs of the group declare are kept (``planned``); the first run to ask computes and
    a copy is kept, every later one gets its own copy and the seconds the computation took. A key's entries are
    dropped once every run declaring it has compressed (``done``)."""

    def __init__(self, keys, device, enabled: bool | None = None):
        counts = Counter(k for k in keys if k is not None)
        on = SHARE_SCORES if enabled is None else enabled
        self.planned: dict = {k: n for k, n in counts.items() if n > 1 and on}
        """Score key -> runs of the group that declare it (two or more)."""
        self.left = dict(self.planned)
        self.entries: dict = {}
        self.device = device
        self.reused_s = 0.0
        """Seconds of the shared computations reused since ``take_reused_s`` (the compression running now)."""

    def get(self, key, compute):
        """``(compute(), 0.0)`` the first time (kept when the key is shared), ``(copy, seconds)`` after."""
        if key[0] not in self.left:
            return compute(), 0.0
        hit = self.entries.get(key)
        if hit is not None:
            value, seconds = hit
            self.reused_s += seconds
            return _clone(value), seconds
        _sync(self.device)
        t0 = time.perf_counter()
        value = compute()
        _sync(self.device)
        self.entries[key] = (_clone(value), time.perf_counter() - t0)
        return value, 0.0

    def sharers(self, key) -> int:
        """Runs planned to share this key's scores (1: not shared)."""
        return self.planned.get(key, 1) if key is not None else 1

    def take_reused_s(self) -> float:
        out, self.reused_s = self.reused_s, 0.0
        return out

    def done(self, key) -> None:
        """A run declaring ``key`` has compressed: the key's entries go with its last run."""
        if key in self.left:
            self.left[key] -= 1
            if self.left[key] <= 0:
                del self.left[key]
                self.entries = {k: v for k, v in self.entries.items() if k[0] != key}

    def clear(self) -> None:
        self.entries, self.left = {}, {}
