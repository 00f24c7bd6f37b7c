"""One example of a grouped sweep (scbench/group.py runs the group): the runs whose first feed is the same computed
once and forked (``run_class``), the runs' prepared batches decoded together while memory holds them
(``room_for_run``, ``decode_pending``), and the retry of a preparation that ran out of memory next to them
(``_retry``). A run's failure is recorded here and the others go on."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from scbench.devices import free_cached_memory

log = logging.getLogger(__name__)

DECODE_RUNS = os.environ.get("SCBENCH_DECODE_RUNS", "1") != "0"
"""``SCBENCH_DECODE_RUNS=0``: a grouped sweep decodes each run's batch apart (for timing one run's batch alone)."""


def can_share(cls) -> bool:
    """Whether a method class's first prefill is the plain dense forward: it declares ``dense_prefill`` and
    overrides none of the hooks that change the first prefill (checked, so a wrong declaration cannot group)."""
    if cls is None or not getattr(cls, "dense_prefill", False):
        return False
    return not {"prefill_attention", "compress_context", "blend_prefill"} & cls.hooks()


@dataclass
class Member:
    """One run of a group on its way through the examples (its method, task, stored turns and error)."""

    job: Any
    """The run's ``scbench.group.Job`` (typed loosely: ``scbench.group`` imports this module, not the reverse)."""
    run_id: str
    spec_dict: dict
    method: object = None
    task: object = None
    done: dict = field(default_factory=dict)
    error: BaseException | None = None
    warmup_s: float = 0.0
    """The run's warm-up seconds (``engine.warmup``), charged to its first computed turn as ``run_spec`` does."""
    retry_s: float = 0.0
    """Seconds of this run's attempts thrown away (an out-of-memory preparation, its share of a failed combined
    decode), charged to the next turn it stores (``TurnStats.retry_s``)."""


def prefill_classes(engine, example, live: list[Member]) -> list[list[Member]]:
    """The live runs of one example split by the tokens of their first feed (``runner.first_feed_ids``): runs of one
    mode feed the same tokens; two modes share a class when their first feeds are equal."""
    from scbench.runner import first_feed_ids

    by_mode: dict[str, list[Member]] = {}
    for m in live:
        by_mode.setdefault(m.job.spec.mode, []).append(m)
    if len(by_mode) < 2:
        return [live] if live else []
    classes: list[tuple[list[int], list[Member]]] = []
    for members in by_mode.values():
        try:
            ids = first_feed_ids(engine, members[0].task, example, members[0].job.spec)
        except Exception:  # noqa: BLE001 - a prompt that cannot be built: these runs fail in their replay, alone
            ids = None
        same = next((c for c in classes if ids is not None and c[0] == ids), None)
        if same is None:
            classes.append((ids, list(members)))
        else:
            same[1].extend(members)
    if len(classes) > 1:
        log.info("example %s: the modes' first prefills differ (%s tokens): one prefill per mode", example.id,
                 " vs ".join(str(len(ids)) if ids is not None else "?" for ids, _ in classes))
    return [members for _, members in classes]


def run_class(engine, members: list[Member], ex, replay, store, bar) -> None:
    """One example's runs that feed the same first prefill: computed once, forked for the others; one run's failure
    is recorded and the others go on. The runs that take the shared prefill go first (its copy is freed after the
    last of them), those that prefill their own way (``can_ride``) after: alone, or, runs of one sparse-prefill
    method config (``own_prefill_key``: both modes with the query hidden), one after another from their own shared
    prefill computed by their kernel. With ``timing=batched`` the runs' batches are
    decoded together (``decode_runs``) while memory holds another run's preparation (``room_for_run``: a cache and
    the most passing work a prefill or a preparation has needed so far); a preparation that runs out of memory anyway
    has the batches so far decoded first and is tried again, alone (``_retry``), and when that runs out of memory too
    (or nothing was prepared to decode first), once more after every other run of the class, with the shared copies
    freed (``_alone``). ``SCBENCH_DECODE_RUNS=0``: one run's batch at a time."""
    from scbench.devices import peak_window
    from scbench.engines.fork import GIB, ForkingEngine, free_device_bytes

    takers, riders, own = prefill_plan(members)  # the riders (``can_ride``) prefill their own way
    members = takers + riders
    shared = _shared_prefill(engine, takers, sparse=False)
    owned = {key: _shared_prefill(engine, runs, sparse=True) for key, runs in own.items()}
    prefills = [shared, *owned.values()]
    pending: list[tuple[Member, object, object]] = []  # (run, its replay, its prepared batch)
    later: list[Member] = []  # runs out of memory even after the batches so far were decoded
    together = DECODE_RUNS and hasattr(replay, "prepare")
    work = 0  # the most bytes a run's preparation allocated beyond what it kept (measured on CUDA)
    try:
        for m in members:
            prepared = None  # the last run's batch (decoded by now, or in ``pending``) is not kept alive by this name
            mine = shared if shares(m) else owned.get(own_prefill_key(m))
            proxy = ForkingEngine(engine, mine) if mine is not None else None
            try:
                rep = replay(proxy or engine, m.method, m.task, ex, m.job.spec, done=m.done.get(ex.id, {}),
                             warmup_s=m.warmup_s)
                if together:
                    big = max(prefills, key=lambda p: p.fork_bytes)
                    if pending and not room_for_run(big, engine.device, pending,
                                                     max(work, *(p.work for p in prefills))):
                        log.info("example %s: no room to prepare %s (%s) next to %d prepared run(s): decoding them "
                                 "first", ex.id, m.method.name, m.job.spec.mode, len(pending))
                        decode_pending(engine, pending, store, bar)
                        free_cached_memory()  # a cycle a method's objects may form frees its cache here too
                    t0 = time.perf_counter()
                    try:
                        with peak_window(engine.device) as w:
                            prepared = rep.prepare()
                    except Exception as e:  # noqa: BLE001
                        if not _out_of_memory(e):
                            raise
                        m.retry_s += time.perf_counter() - t0
                        log.warning("example %s: %s (%s) ran out of memory preparing next to %d prepared run(s): %s",
                                    ex.id, m.method.name, m.job.spec.mode, len(pending), _oom_note(e))
                        prepared = rep = None
                    if rep is None:  # outside the handler: the failed attempt's tensors can go
                        if proxy is not None and not proxy.consumed():
                            mine.skip(m.method)
                        proxy = None  # its session (the failed attempt's cache) goes with it
                        rep, prepared = _retry(engine, m, ex, replay, pending, store, bar)
                        if rep is None:  # out of memory again: after the others, with every shared copy gone
                            later.append(m)
                            continue
                    else:
                        work = max(work, w.passing)
                        if log.isEnabledFor(logging.INFO) and engine.device.type == "cuda":
                            log.info("example %s: %s (%s) prepared (%s): %.1f GiB passing, %.1f GiB free, %d pending",
                                     ex.id, m.method.name, m.job.spec.mode, "batch" if prepared else "sequential",
                                     w.passing / GIB, free_device_bytes(engine.device) / GIB, len(pending))
                    if prepared is not None:
                        pending.append((m, rep, prepared))
                        continue
                    results = rep.sequential()
                else:
                    results = rep
                _store(m, rep, results, store, bar)
            except Exception as e:  # noqa: BLE001 - this run fails, the others go on
                _fail(m, ex, e, store)
            finally:
                if proxy is not None and not proxy.consumed():
                    mine.skip(m.method)
        for p in prefills:  # every run has its cache: the shared copies' memory goes back before the decode
            p.close()
        decode_pending(engine, pending, store, bar)
        for m in later:
            _alone(engine, m, ex, replay, store, bar)
    finally:
        for p in prefills:
            p.close()


def _shared_prefill(engine, runs: list[Member], *, sparse: bool):
    """The ``SharedPrefill`` of ``runs``: the dense one of the sharers (capturing the last queries and log-sum-exps
    their compressions want, and sharing equal score keys), or one sparse-prefill method config's own."""
    from scbench.engines.fork import SharedPrefill, wanted_window

    comp = ["compress_cache" in m.method.hooks() for m in runs]
    windows = [wanted_window(m.method) for m in runs]
    lse = any(c and getattr(m.method, "query_lse", False) for m, c in zip(runs, comp))
    keys = () if sparse else [m.method.score_key() if c else None for m, c in zip(runs, comp)]
    return SharedPrefill(engine, takers=len(runs), window=max(windows, default=0), lse=lse, score_keys=keys,
                         sparse=sparse, windows=windows)


def _out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _oom_note(e: BaseException) -> str:
    """Where an out-of-memory error came from: the innermost scbench frame and the error's first line (torch's
    names the request and what is free)."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "scbench" in f.filename] or \
        traceback.extract_tb(e.__traceback__)[-1:]
    where = f"{frames[-1].filename.rpartition('scbench/')[2]}:{frames[-1].lineno} ({frames[-1].name})" if frames else "?"
    return f"at {where}: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"


def _retry(engine, m: Member, ex, replay, pending: list, store, bar):
    """A run's preparation ran out of memory next to the prepared batches: decode those first, then prepare this run
    again on the plain engine (its first prefill computed alone: the shared one may be gone; the rows are the
    same). Returns ``(replay, prepared batch or None)``, or ``(None, None)`` when there was nothing to decode or it
    runs out of memory again (the attempt's seconds join ``retry_s``): ``run_class`` then prepares it after the
    example's other runs (``_alone``), when no shared copy holds memory any more."""
    if not pending:
        return None, None
    log.warning("example %s: no memory to prepare %s (%s) next to %d prepared run(s): those are decoded first and "
                "it is prepared again, alone", ex.id, m.method.name, m.job.spec.mode, len(pending))
    decode_pending(engine, pending, store, bar)
    free_cached_memory()
    rep = replay(engine, m.method, m.task, ex, m.job.spec, done=m.done.get(ex.id, {}), warmup_s=m.warmup_s)
    t0 = time.perf_counter()
    try:
        return rep, rep.prepare()
    except Exception as e:  # noqa: BLE001
        if not _out_of_memory(e):
            raise
        m.retry_s += time.perf_counter() - t0
        log.warning("example %s: %s (%s) ran out of memory again, alone: %s", ex.id, m.method.name, m.job.spec.mode,
                    _oom_note(e))
    return None, None


def _alone(engine, m: Member, ex, replay, store, bar) -> None:
    """The last try of a run that ran out of memory within its group: prepared and decoded by itself after the
    example's other runs were stored and every shared copy freed (what running it alone would have had). Out of
    memory here is the run's failure."""
    log.warning("example %s: %s (%s) ran out of memory next to the group's other runs; prepared again by itself "
                "after them", ex.id, m.method.name, m.job.spec.mode)
    free_cached_memory()
    try:
        rep = replay(engine, m.method, m.task, ex, m.job.spec, done=m.done.get(ex.id, {}), warmup_s=m.warmup_s)
        prepared = rep.prepare()
        if prepared is None:
            _store(m, rep, rep.sequential(), store, bar)
            return
    except Exception as e:  # noqa: BLE001 - this run fails, the others go on
        _fail(m, ex, e, store)
        return
    decode_pending(engine, [(m, rep, prepared)], store, bar)


def shares(m: Member) -> bool:
    """Whether a run of a group takes the shared first prefill (else it only decodes with the group)."""
    return can_share(type(m.method))


def own_prefill_key(m: Member):
    """For a run that prefills its own way through a sparse-prefill kernel (``prefill_attention``; not prompt
    compression or CacheBlend, which rewrite or assemble the context), what its first prefill depends on besides
    the tokens: the method's class and every knob (``Method.label``). Runs of one prefill class with equal keys (one
    method config in both modes with the query hidden) compute that sparse prefill once and fork it, as the dense
    sharers do. None: the run prefills alone."""
    if shares(m) or not sparse_prefill(type(m.method)):
        return None
    return type(m.method).__qualname__, m.method.label()


def sparse_prefill(cls) -> bool:
    """Whether a method class prefills the tokens as given through its own sparse kernel (``prefill_attention``; not
    prompt compression or CacheBlend, which rewrite or assemble the context): a prefill runs of one config can share."""
    hooks = cls.hooks()
    return "prefill_attention" in hooks and not {"compress_context", "blend_prefill"} & hooks


def prefill_plan(members: list[Member]) -> tuple[list[Member], list[Member], dict]:
    """``(dense sharers, the other runs, own-prefill key -> its runs)`` for one prefill class: the other runs
    ordered so that those sharing a sparse prefill come one after another (its copy goes with the last of them);
    only keys two or more runs declare are listed. The sharers go longest captured-query window first, and runs of
    one method config (both modes of a cross-mode class) one after another: H2O's every-position queries (34 GB at
    131K on the 8B shape) are cut to the next window once its runs have compressed (``SharedPrefill._trim``), before
    the runs that keep a full-size cache prepare; a score shared by a config's runs (``score_key``) is reused at once."""
    from scbench.engines.fork import wanted_window

    takers = [m for m in members if shares(m)]
    first: dict = {}
    for i, m in enumerate(takers):
        first.setdefault(m.method.label(), i)
    takers.sort(key=lambda m: (-wanted_window(m.method), first[m.method.label()]))  # stable: mode order kept
    by_key: dict = {}
    for m in members:
        if not shares(m):
            by_key.setdefault(own_prefill_key(m) or ("alone", id(m)), []).append(m)
    riders = [m for runs in by_key.values() for m in runs]
    return takers, riders, {k: runs for k, runs in by_key.items() if k[0] != "alone" and len(runs) > 1}


def room_for_run(shared, device, pending: list = (), work: int = 0) -> bool:
    """Whether another run of a group can prepare its batch while the earlier ones keep theirs: free memory for one
    more cache as large as a fork of the shared prefill or the largest prepared one, plus the passing work of a
    preparation (``work``: the most a prefill or a preparation has needed beyond what it kept, measured; at least a
    quarter of the cache, ``fork.plan_copy``'s rule) and 2 GiB. On CUDA the allocator's unused cached blocks are
    given back first: counted free but fragmented, they failed a 131K prefill's 3.5 GiB allocation with 19 GiB of
    them held."""
    import torch

    from scbench.engines.fork import GIB, free_device_bytes, free_host_bytes

    sizes = [sum(t.numel() * t.element_size() for layer in p.cache.layers
                 for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))
             for _, _, p in pending]
    big = max([shared.fork_bytes, *sizes])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    free = free_device_bytes(device) if device.type == "cuda" else free_host_bytes()
    return free >= big + max(work, big // 4) + 2 * GIB


def _store(m: Member, rep, results, store, bar) -> None:
    for result in results:
        m.warmup_s = 0.0
        result.stats.retry_s, m.retry_s = result.stats.retry_s + m.retry_s, 0.0
        store.put(m.run_id, result)
        if bar:
            bar.update(1)
    if rep.mismatches:
        store.note_mismatch(m.run_id, rep.mismatches)


def _fail(m: Member, ex, e: BaseException, store) -> None:
    from scbench.run import _record_stop

    m.error = e
    _record_stop(store, m.job.store, m.run_id, m.spec_dict, e)
    log.error("run %s (%s) failed on example %s: %s: %s", m.run_id, m.method.name, ex.id, type(e).__name__, e)
    free_cached_memory()


def decode_pending(engine, pending: list, store, bar) -> None:
    """Decode the prepared batches of several runs as one (``batch.decode_parts``) and store each run's rows; when
    that fails, each run's batch alone (a run that fails then is recorded, the others go on)."""
    from scbench.batch import decode_parts

    items, pending[:] = list(pending), []
    if not items:
        return
    t0 = time.perf_counter()
    try:
        results, step_s, kernels = decode_parts(engine, [(p.cache, p.rows, p.plugin) for _, _, p in items])
    except Exception as e:  # noqa: BLE001
        if len(items) == 1:
            m, rep, _ = items[0]
            _fail(m, rep.example, e, store)
            return
        lost = time.perf_counter() - t0  # the failed attempt's time, shared by the runs redone alone
        for m, _, _ in items:
            m.retry_s += lost / len(items)
        log.warning("decoding %d runs' turns together failed (%s: %s); one run at a time", len(items),
                    type(e).__name__, e)
        free_cached_memory()
        for item in items:
            decode_pending(engine, [item], store, bar)
        return
    batch = sum(len(p.rows) for _, _, p in items)
    for (m, rep, p), gens, kernel in zip(items, results, kernels):
        try:
            _store(m, rep, rep.finish(p, gens, step_s, kernel, runs=len(items), batch=batch), store, bar)
        except Exception as e:  # noqa: BLE001 - this run fails, the others go on
            _fail(m, rep.example, e, store)
