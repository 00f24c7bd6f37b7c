"""One dense first prefill, forked for several methods (the engine side of scbench/group.py).

``SharedPrefill`` holds one example's first prefill: the first run that feeds it computes the plain dense forward
(capturing the last queries the group's compression methods want), keeps a copy of the cache, and every later run
of the group gets a fork of that copy instead of recomputing it. Where the copy lives is planned from free memory
when it is made: the accelerator when the copy and one working cache fit, else host memory (copied back per fork),
else nowhere (each run prefills alone, and a warning says so). The last run to fork takes the copy itself.

``ForkSession`` is an ``HFSession`` whose first feed at position 0 is served from the shared prefill: it installs
the fork, the logits and the captured queries, then runs its own method's compression exactly as ``HFSession.feed``
would; ``FeedStats.seconds`` is the shared prefill's measured time plus this method's compression, and
``extra["prefill_shared"]`` the number of runs planned to share it.

Runs whose methods prefill through their own sparse kernel (``prefill_attention``) share a ``SharedPrefill`` with
``sparse=True`` when their method configs are equal (scbench/group_example.py ``own_prefill_key``: one config in
both modes with the query hidden): the first computes its method's sparse prefill, the others fork it, and what the
prefill set on the first one's method (its per-prefill counters) is copied onto theirs.

``ScoreMemo`` (scbench/engines/score_memo.py) goes one step further: runs of the group whose methods declare the same ``Method.score_key()`` (the
scores depend on the cache and the knobs in the key only, e.g. KVzip's reconstruction at several budgets) compute
their first compression's scores once; each reuse gets a copy, counts the shared computation's measured seconds in
its ``compress_s`` and records ``scores_shared``.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

import torch

from scbench.devices import peak_window, sync as _sync
from scbench.engines import attention
from scbench.engines.base import FeedStats
from scbench.engines.hf_session import HFSession
from scbench.engines.recurrent import _clone  # tensors cloned inside dicts, lists, tuples (a method may change its own)
from scbench.engines.score_memo import ScoreMemo

log = logging.getLogger(__name__)

GIB = 1 << 30
PLANS = ("device", "host", "none")


def free_device_bytes(device: torch.device) -> int:
    """Bytes the accelerator can still hand out (free memory plus what torch's allocator holds unused)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


MEMINFO = "/proc/meminfo"


def free_host_bytes() -> int:
    """Host memory available (Linux ``MemAvailable``; elsewhere psutil's ``available`` when installed; else 0:
    nothing is planned into host memory)."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return 0
    return int(psutil.virtual_memory().available)


def plan_copy(nbytes: int, device: torch.device, *, device_free: int | None = None, host_free: int | None = None) -> str:
    """Where the shared copy of ``nbytes`` goes: ``device`` when it fits next to one working cache and the
    compression's scratch space (a quarter of it, plus 2 GiB) on the accelerator, else ``host`` when host memory
    holds it with 4 GiB to spare, else ``none``. On a CPU device the copy is host memory either way."""
    host_free = free_host_bytes() if host_free is None else host_free
    if device.type != "cuda":
        return "device" if host_free >= nbytes + nbytes // 4 + GIB else "none"
    device_free = free_device_bytes(device) if device_free is None else device_free
    if device_free >= nbytes + nbytes // 4 + 2 * GIB:
        return "device"
    return "host" if host_free >= nbytes + 4 * GIB else "none"


def plan_for(per_device: dict[torch.device, int]) -> str:
    """``plan_copy`` for a cache on one device; split over several (``model.device_map``), the copy stays on the
    devices when every one holds its part, else goes to host memory when that holds it all, else nowhere."""
    if len(per_device) == 1:
        (device, n), = per_device.items()
        return plan_copy(n, device)
    if all(plan_copy(n, d) == "device" for d, n in per_device.items()):
        return "device"
    return "host" if free_host_bytes() >= sum(per_device.values()) + 4 * GIB else "none"


def _copy_layers(cache, where: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if where == "host":  # exact-size page-locked buffers, filled asynchronously (kv/pinned.py)
        from scbench.kv.pinned import host_copies

        flat = host_copies([t for layer in cache.layers for t in (layer.keys, layer.values)])
        return list(zip(flat[0::2], flat[1::2]))
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def wanted_window(method) -> int:
    """The captured prompt queries a run's first compression reads (0: it does not compress)."""
    return method.query_window if "compress_cache" in type(method).hooks() else 0


class SharedPrefill:
    """The first prefill of one example, the plain dense forward or one sparse-prefill method config's own
    (``sparse``), shared by ``takers`` runs (see the module docstring)."""

    def __init__(self, engine, takers: int, window: int = 0, lse: bool = False, score_keys=(), sparse: bool = False,
                 windows=()):
        self.engine, self.takers, self.window, self.lse = engine, takers, window, lse
        """``lse``: a run of the group scores from the forward's log-sum-exp (``Method.query_lse``, H2O): the
        shared forward keeps it with the captured queries, so that run's compression does not recompute it."""
        self.wants: Counter = Counter(windows)
        """Captured-query windows the runs still to fork want (``windows``: one per taker, 0 for a run that does not
        compress; empty: not tracked, the queries stay whole until the last run). Once the runs wanting the longest
        window have compressed (H2O wants every prompt position: 34 GB at 131K on the 8B shape, more than the KV)
        the captured queries are cut to what the rest want (``_trim``)."""
        self.sparse = sparse
        """The takers are runs of one sparse-prefill method config (``group_example.own_prefill_key``): the first
        computes the prefill through its method's ``prefill_attention`` as its own feed would, and what that
        prefill left on the method (``state``) goes to every fork's method; False: the plain dense forward."""
        self.state: dict = {}
        """Attributes the first taker's prefill set or replaced on its method (e.g. vertical-slash's dense-fallback
        counts, read by ``take_costs``): copied onto each fork's method, so its cost columns are its own run's. An
        attribute changed in place is not seen: a method's per-prefill counters start afresh (``take_costs`` pops
        them)."""
        self.computed = 0
        """Attention cells the prefill computed (``attn_computed``; a sparse prefill computes fewer than ``cells``)."""
        self.flag: bool | None = None
        """Whether the prefill ran its method's sparse kernel (the feed's ``sparse``): a fork asking otherwise declines."""
        self.memo = ScoreMemo(score_keys, engine.device)
        """The first compression's scores shared by runs with equal ``Method.score_key()`` (``score_keys``: the
        group's runs' keys)."""
        self.lses: dict[int, tuple] = {}
        """Layer -> (log-sum-exp [B, Hq, w] of the captured queries, keys seen): what ``scbench_lse`` held."""
        self.left = takers
        """Runs that may still fork it; the last one takes the copy itself."""
        self.ids: list[int] | None = None
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.devices: list[torch.device] = []
        self.plan: str | None = None
        self.logits = self.queries = None
        self.seconds = 0.0
        self.cells = 0
        self.forks = 0
        self.nbytes = 0
        """Bytes of the prefilled cache and the captured queries once computed: what its copy takes."""
        self.fork_bytes = 0
        """Bytes of the prefilled cache alone: what a fork of it takes (the captured queries are not copied)."""
        self.work = 0
        """Bytes the prefill's forward allocated beyond what it kept (its passing work, ``devices.peak_window``; 0
        off CUDA): what another run's own prefill of this example needs next to its cache."""

    def skip(self, method=None) -> None:
        """A run of the group will not fork (it failed or had nothing to do); ``method``: its method, whose query
        window it no longer wants."""
        self.left -= 1
        if self.left <= 0:
            self.layers = None
        if method is not None:
            self.done_with(method)

    def done_with(self, method) -> None:
        """``method``'s run has what it needs of the captured queries (it compressed, or will not fork): the queries
        are cut to the longest window a run still to come wants."""
        w = wanted_window(method)
        if not self.wants or self.wants[w] <= 0:
            return
        self.wants[w] -= 1
        keep = max((k for k, n in self.wants.items() if n > 0), default=0)
        if self.queries and any(q.shape[-2] > keep for q in self.queries.values()):
            self._trim(keep)

    def _trim(self, keep: int) -> None:
        """Cut the captured queries and their log-sum-exps to the last ``keep`` positions (copies: the long ones'
        memory goes back)."""
        if not keep:
            self.queries, self.lses = {}, {}
            return
        self.queries = {layer: q[..., max(0, q.shape[-2] - keep):, :].clone() for layer, q in self.queries.items()}
        self.lses = {layer: (lse[..., max(0, lse.shape[-1] - keep):].clone(), n) for layer, (lse, n) in self.lses.items()}

    def close(self) -> None:
        self.layers = self.logits = self.queries = None
        self.lses = {}
        self.memo.clear()

    def take(self, session: "ForkSession", ids: list[int], sparse: bool = False) -> bool:
        """Fill ``session`` (empty) with the prefill of ``ids``: computed here if this is the first taker, else
        forked. ``sparse``: the feed asks for its method's sparse kernel (the runner's ``policy.sparse_prefill``).
        False when the shared prefill cannot serve it (other tokens, another kernel, or no copy could be kept)."""
        self.left -= 1
        sparse = bool(self.sparse and sparse and "prefill_attention" in session.hooks)
        if self.ids is None:
            self._compute(session, ids, sparse)
            return True
        if ids != self.ids or sparse != self.flag:
            log.warning("shared prefill: a run of the group feeds other tokens first (%d vs %d%s); it prefills alone",
                        len(ids), len(self.ids), "" if sparse == self.flag else ", another kernel")
            return False
        if self.layers is None:  # plan "none": no copy was kept
            return False
        last = self.left <= 0 and self.plan == "device"
        for layer, (k, v), dev in zip(session.cache.layers, self.layers, self.devices):
            if last:
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            else:  # back to the layer's own device (a model split over devices keeps its layers where they were)
                layer.update(k.to(dev, non_blocking=True), v.to(dev, non_blocking=True))
        if len(session.cache.layers) != len(self.layers):
            raise RuntimeError("shared prefill: the forked cache has another number of layers")
        if self.left <= 0:
            self.layers = None
        session.pos = len(ids)
        session.last_logits = self.logits.clone()
        vars(session.method).update(_clone(self.state))
        self.forks += 1
        return True

    def _compute(self, session: "ForkSession", ids: list[int], sparse: bool = False) -> None:
        ctx = attention.AttnContext(method=session.method, sparse=sparse, capture_queries=self.window, lse=self.lse)
        dev = self.engine.device
        before = dict(vars(session.method)) if self.sparse else {}
        _sync(dev)
        t0 = time.perf_counter()
        with peak_window(dev) as w:
            session.last_logits = session._prefill(ids, ctx)
        _sync(dev)
        self.seconds = time.perf_counter() - t0
        self.work = w.passing
        self.flag = sparse
        if self.sparse:
            self.state = {k: _clone(v) for k, v in vars(session.method).items() if before.get(k, self) is not v}
        self.cells, self.computed = ctx.cells_total, ctx.cells_computed
        self.ids = list(ids)
        self.logits = session.last_logits.clone()
        self.queries = ctx.queries
        self.lses = {layer: q.scbench_lse for layer, q in self.queries.items() if hasattr(q, "scbench_lse")}
        if self.left <= 0:
            self.plan = "alone"
            return
        # the captured queries stay until the last run compressed (H2O's are every prompt position: often more
        # bytes than the KV), so they count in the plan and follow the copy to host memory
        per_device: dict[torch.device, int] = {}
        for t in ([x for layer in session.cache.layers for x in (layer.keys, layer.values)] + list(self.queries.values())
                  + [lse for lse, _ in self.lses.values()]):
            per_device[t.device] = per_device.get(t.device, 0) + t.numel() * t.element_size()
        nbytes = self.nbytes = sum(per_device.values())
        self.fork_bytes = sum(t.numel() * t.element_size() for layer in session.cache.layers
                              for t in (layer.keys, layer.values))
        self.plan = plan_for(per_device)
        if self.plan == "none":
            log.warning("shared prefill: no room for a %.1f GiB copy of the prefilled cache on %s or in host memory; "
                        "the other %d run(s) of this example prefill alone", nbytes / GIB, dev, self.left)
            return
        if self.plan == "host":
            log.warning("shared prefill: the %.1f GiB prefilled cache does not fit twice on %s; kept in host memory "
                        "and copied back for each of %d run(s)", nbytes / GIB, dev, self.left)
        self.devices = [layer.keys.device for layer in session.cache.layers]
        self.layers = _copy_layers(session.cache, self.plan)
        if self.plan == "host":
            self.queries = {layer: q.cpu() for layer, q in self.queries.items()}
            self.lses = {layer: (lse.cpu(), n) for layer, (lse, n) in self.lses.items()}

    def shared_queries(self, window: int) -> dict[int, torch.Tensor]:
        """The captured queries cut to the last ``window`` positions (what a feed capturing ``window`` keeps)."""
        dev = self.engine.device
        out = {layer: q[..., -window:, :].to(dev).contiguous() for layer, q in (self.queries or {}).items()}
        for layer, q in out.items():
            if layer in self.lses:  # the same positions' log-sum-exps (H2O scores from them: one pass fewer)
                lse, n = self.lses[layer]
                q.scbench_lse = (lse[..., -window:].to(dev).contiguous(), n)
        return out


class ForkSession(HFSession):
    """An ``HFSession`` whose first feed is served by a ``SharedPrefill`` (see the module docstring)."""

    def __init__(self, engine, method, shared: SharedPrefill):
        super().__init__(engine, method)
        self.shared = shared

    def feed(self, ids, *, compress, sparse):
        shared, self.shared = self.shared, None  # only the session's first feed can be the shared one
        if shared is None or self.pos != 0 or not ids:
            return super().feed(ids, compress=compress, sparse=sparse)
        dev = self.engine.device
        if not shared.take(self, ids, sparse):
            return super().feed(ids, compress=compress, sparse=sparse)
        compress = compress and "compress_cache" in self.hooks
        compress_s = 0.0
        scores_shared = 1
        if compress:
            window = self.method.query_window
            ctx = attention.AttnContext(method=self.method, capture_queries=window)
            if window:
                if window > shared.window:
                    raise RuntimeError(f"shared prefill captured {shared.window} queries, the method wants {window}")
                ctx.queries = shared.shared_queries(window)
            key = self.method.score_key()
            _sync(dev)
            t1 = time.perf_counter()
            self.score_memo = shared.memo  # this compression only: the cache is the shared prefill's
            try:
                self._compress(ctx, ids)
            finally:
                self.score_memo = None
                shared.memo.done(key)
            _sync(dev)
            # a reused score counts as the run's own work: compress_s is what the compression costs a run alone
            compress_s = time.perf_counter() - t1 + shared.memo.take_reused_s()
            scores_shared = shared.memo.sharers(key)
        shared.done_with(self.method)
        if shared.left <= 0:  # the last run of the group has what it needs
            shared.close()
        return FeedStats(tokens=len(ids), reused=0, seconds=shared.seconds + compress_s, compress_s=compress_s,
                         attn_cells=shared.cells, attn_computed=shared.computed,
                         prefill_shared=shared.takers if shared.plan in ("device", "host") else 1,
                         scores_shared=scores_shared)


class ForkingEngine:
    """The engine as one run of a group sees it: its first session forks ``shared``; everything else delegates."""

    def __init__(self, engine, shared: SharedPrefill):
        self._engine, self._shared = engine, shared
        self._forked: ForkSession | None = None

    def consumed(self) -> bool:
        """Whether this run has taken (or declined) its turn at the shared prefill."""
        return self._shared is None and (self._forked is None or self._forked.shared is None)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def session(self, method):
        base = self._engine.session(method)
        shared, self._shared = self._shared, None
        if shared is None:
            return base
        if type(base) is not HFSession:  # recurrent state: no fork; this run prefills alone
            shared.skip(method)
            return base
        self._forked = ForkSession(self._engine, method, shared)
        return self._forked
