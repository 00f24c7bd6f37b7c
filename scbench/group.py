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
(sparse prefill, prompt compression, CacheBlend) join the group to decode with it (``can_ride``), prefilling alone;
runs of one sparse-prefill method config whose first feeds are equal (both modes with the query hidden) compute
that sparse prefill once and fork it (``group_example.own_prefill_key``).
Other runs (another engine, naive replay, ``timing=sequential`` for those methods) run alone through ``run_spec``.

One example's work (the shared prefill, the forks, the runs decoded together, memory) is in
scbench/group_example.py.

``scbench run -m`` with the basic launcher queues its jobs here (``share_prefill: true``, the default) and runs
them when the sweep ends (``SweepCallback``); other launchers run every job on its own as before.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Callable

from scbench.group_example import DECODE_RUNS, Member, can_share, own_prefill_key, prefill_classes, run_class, shares
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
    members: list[Member] = []
    outcomes: list[Outcome] = []
    examples = picked = None
    for job in jobs:
        spec_dict = run_spec_dict(job.spec, job.engine_name, job.engine_options)
        m = Member(job, spec_hash(spec_dict), spec_dict)
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
    claimed: list[Member] = []
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
                 "; decoded with them: " + ", ".join(
                     f"{m.method.name} ({m.job.spec.mode}{', own prefill shared' if own_sharers(m, claimed) > 1 else ''})"
                     for m in claimed if not shares(m)) if sharers < len(claimed) else "")
        total = sum(n_turns(e, m.job.spec) for e in mine for m in claimed)
        todo = total - sum(len(m.done.get(e.id, {})) for e in mine for m in claimed)
        reset = getattr(engine, "reset_peak_memory", None)
        if reset is not None:  # the group's runs record the group's peak, not an earlier run's (as in run_spec)
            reset()
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
                run_class(engine, members, ex, replay, store, bar)
        for m in claimed:
            n = sharers if shares(m) else own_sharers(m, claimed)
            if m.error is not None:
                outcomes.append(Outcome(m.job, m.run_id, m.error, n))
                continue
            finished = picked is None or store.complete(m.run_id)
            store.finish_run(m.run_id, "done" if finished else "partial")
            outcomes.append(Outcome(m.job, m.run_id, None, n))
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


def own_sharers(m: Member, claimed: list[Member]) -> int:
    """Runs of the group planned to share ``m``'s own sparse prefill (``own_prefill_key``; 1: it prefills alone).
    Modes whose first feeds differ split the group per example (``prefill_classes``): then the count is an upper
    bound, as ``sharers`` is for the dense prefill; each turn records the count that really shared it."""
    key = own_prefill_key(m)
    return sum(own_prefill_key(o) == key for o in claimed) if key is not None else 1


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
