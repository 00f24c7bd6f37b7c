"""Grouped sweep execution: one first prefill per example shared by every method of a sweep that can share it.

Runs of a sweep that share model, engine, task, data, mode and every policy (their RunSpecs differ only in the
method), whose methods declare ``dense_prefill`` (full attention, eviction, quantisation, loading), are processed
example by example in one process: for each example the first run computes the plain dense first prefill, the
others get a fork of its cache (scbench/engines/fork.py plans where the copy lives from free memory), and each
run's compression and turns then proceed exactly as in its own run. Every run keeps its own run id, rows and
resume point (rows are committed turn by turn, so a kill loses no finished turn); its first turn records in
``prefill_shared`` how many runs shared the prefill. Runs whose methods score alike (``Method.score_key()``: e.g.
KVzip at several budgets) also compute their first compression's scores once (``scores_shared``). With
``timing=batched`` the runs' batches of an example are decoded as one (``decode_runs``; the weights read once per
step for every run, each run's rows attending to its own cache), and runs whose methods prefill their own way
(sparse prefill, prompt compression, CacheBlend) join the group to decode with it (``can_ride``), prefilling alone.
Other runs (another engine, naive replay, ``timing=sequential`` for those methods) run alone through ``run_spec``.

``scbench run -m`` with the basic launcher queues its jobs here (``share_prefill: true``, the default) and runs
them when the sweep ends (``SweepCallback``); other launchers run every job on its own as before.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from scbench.devices import free_cached_memory
from scbench.records import RunSpec

log = logging.getLogger(__name__)

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


@dataclass
class Job:
    """One run of a sweep and how to launch it (the arguments of ``run_spec``)."""

    spec: RunSpec
    store: str
    engine_name: str = "hf"
    engine_options: dict = field(default_factory=dict)
    shard: str | None = None
    device: str | None = None
    progress: bool = True
    timing: str = "sequential"
    on_error: Callable[[BaseException], None] | None = field(default=None, compare=False, repr=False)
    """Called with the error when the run fails (the CLI notes the sweep job's failure for its exit status)."""


@dataclass
class Outcome:
    job: Job
    run_id: str | None = None
    error: BaseException | None = None
    shared: int = 1
    """Runs it was grouped with (itself included); 1: it ran alone."""


def _method_class(spec: RunSpec):
    from scbench.registry import METHODS

    name = spec.method.get("name") if isinstance(spec.method, dict) else None
    try:
        return METHODS.get(name)
    except Exception:  # noqa: BLE001 - an unknown method runs alone and fails there, with its own error
        return None


def can_share(cls) -> bool:
    """Whether a method class's first prefill is the plain dense forward: it declares ``dense_prefill`` and
    overrides none of the hooks that change the first prefill (checked, so a wrong declaration cannot group)."""
    if cls is None or not getattr(cls, "dense_prefill", False):
        return False
    return not {"prefill_attention", "compress_context", "blend_prefill"} & cls.hooks()


def can_ride(job: Job) -> bool:
    """Whether a job whose method prefills its own way (sparse prefill, prompt compression, CacheBlend) joins a
    group anyway, to decode its turns in the group's batch (``decode_runs``): ``timing=batched`` with runs decoded
    together (``DECODE_RUNS``). It prefills alone, as it would on its own (``prefill_shared`` 1)."""
    cls = _method_class(job.spec)
    return (cls is not None and job.timing == "batched" and DECODE_RUNS and "engine_args" not in vars(cls)
            and "decode_attention" not in cls.hooks())


def group_key(job: Job):
    """Jobs with equal keys can share their first prefill; None: the job runs alone.

    The mode is part of the key unless the first query is hidden from compression (``policy.query_visible=false``):
    multi-request first feeds the context alone (prompt 0, cut before the query), multi-turn by default its whole
    first prompt (context + query + generation prompt) in one forward, so the two modes' first prefills differ;
    with the query hidden, multi-turn first feeds the same context tokens (``runner.first_feed_ids``), and a group
    holds both modes (per example, runs whose first-feed tokens differ, e.g. truncated differently, get separate
    prefills)."""
    spec = job.spec
    if job.engine_name != "hf" or not spec.reuse or not (can_share(_method_class(spec)) or can_ride(job)):
        return None
    apart = {"method"} if spec.query_visible else {"method", "mode"}
    rest = {k: v for k, v in dataclasses.asdict(spec).items() if k not in apart}
    return (job.store, job.shard, job.device, job.timing, json.dumps(job.engine_options, sort_keys=True, default=str),
            json.dumps(rest, sort_keys=True, default=str))


def plan_groups(jobs: list[Job]) -> list[list[Job]]:
    """Jobs grouped by ``group_key`` in order of first appearance; ungroupable jobs are groups of one."""
    groups: dict[object, list[Job]] = {}
    order: list[list[Job]] = []
    for job in jobs:
        key = group_key(job)
        if key is None:
            order.append([job])
            continue
        if key not in groups:
            groups[key] = []
            order.append(groups[key])
        groups[key].append(job)
    return order


def run_jobs(jobs: list[Job], *, group: bool = True, engine=None) -> list[Outcome]:
    """Run every job (grouped where possible when ``group``); one job's failure never stops the others."""
    from scbench.run import run_spec

    outcomes: list[Outcome] = []
    for members in plan_groups(jobs) if group else [[j] for j in jobs]:
        if len(members) > 1:
            outcomes += run_group(members, engine=engine)
            continue
        job = members[0]
        try:
            run_id = run_spec(job.spec, job.store, engine=engine, engine_name=job.engine_name, progress=job.progress,
                              shard=job.shard, device=job.device, engine_options=job.engine_options, timing=job.timing)
            outcomes.append(Outcome(job, run_id))
        except Exception as e:  # noqa: BLE001 - recorded in the store by run_spec; the sweep goes on
            log.error("run %s %s %s failed: %s: %s", job.spec.task, job.spec.mode, job.spec.method.get("name"),
                      type(e).__name__, e)
            outcomes.append(Outcome(job, error=e))
    return outcomes


@dataclass
class _Member:
    job: Job
    run_id: str
    spec_dict: dict
    method: object = None
    task: object = None
    done: dict = field(default_factory=dict)
    error: BaseException | None = None
    warmup_s: float = 0.0
    """The run's warm-up seconds (``engine.warmup``), charged to its first computed turn as ``run_spec`` does."""


def prefill_classes(engine, example, live: list[_Member]) -> list[list[_Member]]:
    """The live runs of one example split by the tokens of their first feed (``runner.first_feed_ids``): runs of one
    mode feed the same tokens; two modes share a class when their first feeds are equal."""
    from scbench.runner import first_feed_ids

    by_mode: dict[str, list[_Member]] = {}
    for m in live:
        by_mode.setdefault(m.job.spec.mode, []).append(m)
    if len(by_mode) < 2:
        return [live] if live else []
    classes: list[tuple[list[int], list[_Member]]] = []
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


def run_group(jobs: list[Job], *, engine=None) -> list[Outcome]:
    """Run jobs whose specs differ only in a prefill-sharing method, example by example, sharing each example's
    first prefill (see the module docstring). Each run is validated, leased, recorded, checked on resume and
    finished as ``run_spec`` does it; one run's failure is recorded and the others go on."""
    from scbench.batch import replay_class
    from scbench.data import load_examples
    from scbench.provenance import collect, spec_hash
    from scbench.registry import TASKS
    from scbench.run import _record_stop, finished, get_engine, parse_shard, record_failure, run_spec_dict, shard_key
    from scbench.validate import check_spec
    from scbench.runner import n_turns
    from scbench.store import Store

    lead = jobs[0]
    members: list[_Member] = []
    outcomes: list[Outcome] = []
    examples = picked = None
    for job in jobs:
        spec_dict = run_spec_dict(job.spec, job.engine_name, job.engine_options)
        m = _Member(job, spec_hash(spec_dict), spec_dict)
        try:
            picked = parse_shard(job.shard)
            replay_class(job.timing)
            m.method = check_spec(job.spec, job.engine_name, model=engine is None)  # scbench/validate.py
            m.task = TASKS.get(job.spec.task).with_variant(job.spec.task_variant)
            if picked is None and finished(job.store, m.run_id):  # a re-launch: no model loads for it
                log.warning("run %s is done (every turn stored in %s): nothing to do", m.run_id, job.store)
                outcomes.append(Outcome(job, m.run_id))
                continue
            if job.spec.model.get("device_map") not in (None, "", "null", "none") and m.method.sharded:
                raise ValueError(f"method {m.method.name!r} cannot run on a model split over devices "
                                 f"(model.device_map): {m.method.sharded}")
            if m.method.engine_args():
                raise ValueError(f"method {m.method.name!r} needs engine arguments; it cannot share an engine")
            if engine is None:
                model = dict(job.spec.model, device=job.device) if job.device else job.spec.model
                engine = get_engine(model, job.engine_name, job.engine_options)
            if examples is None:
                data = dict(job.spec.data)
                source = data.pop("source", "generated")
                loaded = load_examples(m.task, source, count=lambda t: len(engine.encode(t, add_special_tokens=False)),
                                       **data)
                examples = m.task.prepare_examples(loaded, job.spec.max_turns)
            members.append(m)
        except Exception as e:  # noqa: BLE001 - this run fails, the group goes on
            try:
                record_failure(job.store, m.run_id, spec_dict, e)
            except Exception:  # noqa: BLE001
                log.exception("could not record the failure of run %s in %s", m.run_id, job.store)
            log.error("run %s (%s) failed before it started: %s: %s", m.run_id, job.spec.method.get("name"),
                      type(e).__name__, e)
            outcomes.append(Outcome(job, m.run_id, e))
    if not members:
        return outcomes
    spec = lead.spec
    mine = examples if picked is None else [ex for k, ex in enumerate(examples) if k % picked[1] == picked[0]]
    replay = replay_class(lead.timing)
    lease = shard_key(picked)
    store = Store(lead.store)
    claimed: list[_Member] = []
    bar = None
    try:
        for m in members:
            owner = store.claim(m.run_id, lease)
            if owner is not None:
                log.warning("run %s%s: skipped, another process computes it (%s pid %s)", m.run_id,
                            f" shard {lead.shard}" if picked else "", owner["host"], owner["pid"])
                outcomes.append(Outcome(m.job, m.run_id))
                continue
            claimed.append(m)
            store.open_run(m.run_id, model=engine.describe()["model"], method=m.method.name,
                           method_label=m.method.label(), task=m.task.name, mode=m.job.spec.mode, spec=m.spec_dict,
                           provenance=collect(engine.describe(), m.method.describe(), m.task))
            store.set_expected(m.run_id, {e.id: n_turns(e, m.job.spec) for e in examples})
            m.done = store.done_turns(m.run_id)
        modes = "+".join(dict.fromkeys(m.job.spec.mode for m in claimed))
        sharers = sum(shares(m) for m in claimed)
        log.info("grouped %d runs of %s %s: one first prefill per example, shared by %s%s", len(claimed), spec.task,
                 modes, ", ".join(f"{m.method.name} ({m.job.spec.mode})" for m in claimed if shares(m)),
                 "; decoded with them: " + ", ".join(f"{m.method.name} ({m.job.spec.mode})" for m in claimed
                                                     if not shares(m)) if sharers < len(claimed) else "")
        total = sum(n_turns(e, m.job.spec) for e in mine for m in claimed)
        todo = total - sum(len(m.done.get(e.id, {})) for e in mine for m in claimed)
        warm = getattr(engine, "warmup", None)
        for m in claimed:  # one-time costs (compilation, graph capture) before the first timed turn, as in run_spec
            if warm is not None and any(len(m.done.get(e.id, {})) < n_turns(e, m.job.spec) for e in mine):
                m.warmup_s = warm(m.method)
        if lead.progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=total - todo, unit="turn",
                       desc=f"{spec.task} {modes} {len(claimed)} runs (shared prefill)")
        for ex in mine:
            live = [m for m in claimed if m.error is None and len(m.done.get(ex.id, {})) < n_turns(ex, m.job.spec)]
            for members in prefill_classes(engine, ex, live):
                _run_class(engine, members, ex, replay, store, bar)
        for m in claimed:
            if m.error is not None:
                outcomes.append(Outcome(m.job, m.run_id, m.error, sharers if shares(m) else 1))
                continue
            finished = picked is None or store.complete(m.run_id)
            store.finish_run(m.run_id, "done" if finished else "partial")
            outcomes.append(Outcome(m.job, m.run_id, None, sharers if shares(m) else 1))
    except BaseException as e:
        for m in claimed:
            if m.error is None:
                _record_stop(store, lead.store, m.run_id, m.spec_dict, e)
        raise
    finally:
        if bar:
            bar.close()
        for m in claimed:
            try:
                store.release(m.run_id, lease)
            except Exception:  # noqa: BLE001 - the owner's exit frees it
                log.warning("could not release the lease of run %s in %s", m.run_id, lead.store)
        store.close()
    return outcomes


def _run_class(engine, members: list[_Member], ex, replay, store, bar) -> None:
    """One example's runs that feed the same first prefill: computed once, forked for the others; one run's failure
    is recorded and the others go on. The runs that take the shared prefill go first (its copy is freed after the
    last of them), those that prefill alone (``can_ride``) after. With ``timing=batched`` the runs' batches are
    decoded together (``decode_runs``) while memory holds another run's preparation (``room_for_run``: a cache and
    the most passing work a prefill or a preparation has needed so far); a preparation that runs out of memory anyway
    has the batches so far decoded first and is tried again, alone (``_retry``). ``SCBENCH_DECODE_RUNS=0``: one
    run's batch at a time."""
    from scbench.devices import peak_window
    from scbench.engines.fork import ForkingEngine, SharedPrefill

    takers = [m for m in members if shares(m)]  # the others (``can_ride``) prefill alone, then decode with them
    members = takers + [m for m in members if not shares(m)]
    window = max((m.method.query_window for m in takers if "compress_cache" in m.method.hooks()), default=0)
    lse = any(getattr(m.method, "query_lse", False) for m in takers if "compress_cache" in m.method.hooks())
    keys = [m.method.score_key() if "compress_cache" in m.method.hooks() else None for m in takers]
    shared = SharedPrefill(engine, takers=len(takers), window=window, lse=lse, score_keys=keys)
    pending: list[tuple[_Member, object, object]] = []  # (run, its replay, its prepared batch)
    together = DECODE_RUNS and hasattr(replay, "prepare")
    work = 0  # the most bytes a run's preparation allocated beyond what it kept (measured on CUDA)
    try:
        for m in members:
            proxy = ForkingEngine(engine, shared) if shares(m) else None
            try:
                rep = replay(proxy or engine, m.method, m.task, ex, m.job.spec, done=m.done.get(ex.id, {}),
                             warmup_s=m.warmup_s)
                if together:
                    if pending and not room_for_run(shared, engine.device, pending, max(work, shared.work)):
                        _decode_pending(engine, pending, store, bar)
                    try:
                        with peak_window(engine.device) as w:
                            prepared = rep.prepare()
                    except Exception as e:  # noqa: BLE001
                        if not (pending and _out_of_memory(e)):
                            raise
                        prepared = rep = None
                    if rep is None:  # outside the handler: the failed attempt's tensors can go
                        if proxy is not None and not proxy.consumed():
                            shared.skip()
                        proxy = None  # its session (the failed attempt's cache) goes with it
                        rep, prepared = _retry(engine, m, ex, replay, pending, store, bar)
                    else:
                        work = max(work, w.passing)
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
                    shared.skip()
        shared.close()  # every run has its cache: the shared copy's memory goes back before the decode
        _decode_pending(engine, pending, store, bar)
    finally:
        shared.close()


def _out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _retry(engine, m: _Member, ex, replay, pending: list, store, bar):
    """A run's preparation ran out of memory next to the prepared batches: decode those first, then prepare this run
    again on the plain engine (its first prefill computed alone: the shared one may be gone; the rows are the
    same). Returns ``(replay, prepared batch or None)``."""
    log.warning("example %s: no memory to prepare %s (%s) next to %d prepared run(s): those are decoded first and "
                "it is prepared again, alone", ex.id, m.method.name, m.job.spec.mode, len(pending))
    _decode_pending(engine, pending, store, bar)
    free_cached_memory()
    rep = replay(engine, m.method, m.task, ex, m.job.spec, done=m.done.get(ex.id, {}), warmup_s=m.warmup_s)
    return rep, rep.prepare()


DECODE_RUNS = os.environ.get("SCBENCH_DECODE_RUNS", "1") != "0"
"""``SCBENCH_DECODE_RUNS=0``: a grouped sweep decodes each run's batch apart (for timing one run's batch alone)."""


def shares(m: _Member) -> bool:
    """Whether a run of a group takes the shared first prefill (else it only decodes with the group)."""
    return can_share(type(m.method))


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


def _store(m: _Member, rep, results, store, bar) -> None:
    for result in results:
        m.warmup_s = 0.0
        store.put(m.run_id, result)
        if bar:
            bar.update(1)
    if rep.mismatches:
        store.note_mismatch(m.run_id, rep.mismatches)


def _fail(m: _Member, ex, e: BaseException, store) -> None:
    from scbench.run import _record_stop

    m.error = e
    _record_stop(store, m.job.store, m.run_id, m.spec_dict, e)
    log.error("run %s (%s) failed on example %s: %s: %s", m.run_id, m.method.name, ex.id, type(e).__name__, e)
    free_cached_memory()


def _decode_pending(engine, pending: list, store, bar) -> None:
    """Decode the prepared batches of several runs as one (``batch.decode_parts``) and store each run's rows; when
    that fails, each run's batch alone (a run that fails then is recorded, the others go on)."""
    from scbench.batch import decode_parts

    items, pending[:] = list(pending), []
    if not items:
        return
    try:
        results, step_s, kernels = decode_parts(engine, [(p.cache, p.rows, p.plugin) for _, _, p in items])
    except Exception as e:  # noqa: BLE001
        if len(items) == 1:
            m, rep, _ = items[0]
            _fail(m, rep.example, e, store)
            return
        log.warning("decoding %d runs' turns together failed (%s: %s); one run at a time", len(items),
                    type(e).__name__, e)
        free_cached_memory()
        for item in items:
            _decode_pending(engine, [item], store, bar)
        return
    batch = sum(len(p.rows) for _, _, p in items)
    for (m, rep, p), gens, kernel in zip(items, results, kernels):
        try:
            _store(m, rep, rep.finish(p, gens, step_s, kernel, runs=len(items), batch=batch), store, bar)
        except Exception as e:  # noqa: BLE001 - this run fails, the others go on
            _fail(m, rep.example, e, store)


# --- the sweep hook: the basic launcher queues jobs, the end of the sweep runs them grouped ------------------
QUEUE: list[Job] = []
FAILED: list[Outcome] = []
"""Queued jobs that failed (their runs are recorded as failed in the store), for whoever reports the sweep's end."""


def should_defer(hydra_cfg, cfg) -> bool:
    """Queue this multirun job for grouped execution: the basic launcher (one process) and ``share_prefill`` on."""
    if hydra_cfg.mode.name != "MULTIRUN" or not bool(cfg.get("share_prefill", True)):
        return False
    return hydra_cfg.launcher.get("_target_") == BASIC_LAUNCHER


def describe(outcome: Outcome) -> str:
    job = outcome.job
    return (f"run {outcome.run_id}: {job.spec.task} {job.spec.mode} {job.spec.method['name']}"
            + (f" shard {job.shard}" if job.shard else "") + (f" on {job.device}" if job.device else "")
            + (f" (prefill shared by {outcome.shared} runs)" if outcome.shared > 1 else "") + f" -> {job.store}")


def run_queued() -> list[Outcome]:
    """Run (grouped) and empty the queue; prints one line per run as ``scbench run`` does."""
    jobs, QUEUE[:] = list(QUEUE), []
    outcomes = run_jobs(jobs)
    for o in outcomes:
        if o.error is None:
            print(describe(o))
        else:
            FAILED.append(o)
            if o.job.on_error is not None:
                o.job.on_error(o.error)
    return outcomes


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object


class SweepCallback(Callback):
    """Hydra callback (configs/config.yaml ``hydra.callbacks``): runs the queued jobs when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if QUEUE:
            run_queued()
