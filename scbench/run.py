"""Run one RunSpec end to end: validate, load data and model, replay, store every finished turn."""
from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from pathlib import Path

from scbench import checks, provenance
from scbench.data import load_examples
from scbench.records import RunSpec
from scbench.registry import ENGINES, TASKS
from scbench.runner import n_turns
from scbench.store import Store, StoreError
from scbench.validate import SpecError, check_method, check_model_path, check_spec

log = logging.getLogger(__name__)


def build_method(cfg: dict):
    """Method instance from ``{name: ..., knob: value}``; unknown names and knobs, wrong types and values get a
    SpecError (a ValueError) naming the knob, with a did-you-mean."""
    return check_method(cfg, engine_name=None)


RESOURCE_OPTIONS = {"gpu_memory_utilization", "cpu_kvcache_space_gib", "cpu_threads_bind"}
"""Engine options that size resources without changing results: not part of the run id (a re-launch with
less memory resumes the same run)."""


def get_engine(model: dict, engine: str = "hf", options: dict | None = None):
    """The process's engine for a model config, engine name (``scbench.registry.ENGINES``) and engine options.

    ``options``: the engine's knobs (``configs/engine/<name>.yaml`` less ``name``, plus the method's
    ``engine_args()``); the hf engine takes none. Only one vLLM engine lives at a time: it reserves its
    device's memory, so asking for another closes the previous one.
    """
    return ENGINES.open(model, engine, options)


def parse_shard(shard) -> tuple[int, int] | None:
    """``None`` or ``"i/n"`` (0 <= i < n) -> ``(i, n)``; anything else is a ValueError with the expected form."""
    if shard is None or shard == "" or shard == "null":
        return None
    text = str(shard).strip()
    i, sep, n = text.partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(i), int(n)
    except ValueError:
        raise ValueError(f"shard must be null or 'i/n' with integers 0 <= i < n (e.g. shard=0/4), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need n >= 1 and 0 <= i < n")
    return i, n


def record_failure(store_path: str, run_id: str, spec_dict: dict, error: BaseException | str) -> None:
    """Write a failed run row (or mark an existing run failed) for a job that stopped before or during its run."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}"
    store = Store(store_path)
    try:
        store.record_failure(run_id, spec=spec_dict, error=text)
    finally:
        store.close()


def finished(store_path: str, run_id: str) -> bool:
    """Whether the store already holds ``run_id`` as done (read without creating a missing store)."""
    import sqlite3

    if not Path(store_path).exists():
        return False
    try:
        db = sqlite3.connect(f"file:{Path(store_path).resolve()}?mode=ro", uri=True, timeout=60)
        try:
            row = db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return row is not None and row[0] == "done"


def shard_key(picked: tuple[int, int] | None) -> str:
    """The lease key of a shard ("" for a whole run): shards of one run are computed by separate processes."""
    return "" if picked is None else f"{picked[0]}/{picked[1]}"


def _record_stop(store: Store, store_path: str, run_id: str, spec_dict: dict, error: BaseException) -> None:
    """Mark the run failed with ``error``; when the store write itself fails (a full disk, a broken file) try a
    fresh connection, and say so on the log when that fails too (the run then reads ``interrupted`` once this
    process is gone)."""
    text = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}"
    status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
    try:
        store.finish_run(run_id, status, text)
        return
    except Exception as first:  # noqa: BLE001
        try:
            record_failure(store_path, run_id, spec_dict, text)
        except Exception as second:  # noqa: BLE001
            log.error("run %s failed (%s: %s) and the store could not record it: %s; then %s",
                      run_id, type(error).__name__, error, first, second)


def run_spec_dict(spec: RunSpec, engine_name: str = "hf", engine_options: dict | None = None) -> dict:
    """What a run's id hashes: the spec, plus the engine and its non-resource knobs for an engine other than hf
    (another engine's run is another run; hf runs keep their ids)."""
    spec_dict = dataclasses.asdict(spec)
    if spec.compress != "decode_every":  # the decode-compression knobs only matter then: other runs keep their ids
        del spec_dict["decode_interval"], spec_dict["decode_cap"]
    if spec.truncation == "reference":  # runs from before the knob keep their ids
        del spec_dict["truncation"]
    if engine_name != "hf":
        spec_dict["engine"] = {"name": engine_name,
                               **{k: v for k, v in (engine_options or {}).items() if k not in RESOURCE_OPTIONS}}
    return spec_dict


def run_id_of(spec: RunSpec, engine_name: str = "hf", engine_options: dict | None = None) -> str:
    """The id ``run_spec`` stores ``spec`` under (resume and merge find runs by it)."""
    return provenance.spec_hash(run_spec_dict(spec, engine_name, engine_options))


def run_spec(spec: RunSpec, store_path: str, *, engine=None, engine_name: str = "hf", progress: bool = True,
             shard: str | None = None, device: str | None = None, engine_options: dict | None = None,
             timing: str = "sequential", record_spec_errors: bool = True, strict: bool = False) -> str:
    """Run (or resume) ``spec``; returns the run id. Validates everything before loading a model.

    ``shard="i/n"`` processes only the examples whose index % n == i; shards share the run id (the shard is
    not part of the spec) and write disjoint (example, turn) rows. The run is marked ``done`` once every
    example of the whole run is stored, ``partial`` when this shard finished and others have not.
    ``device`` overrides the model's device without changing the run id (one job per GPU).
    ``engine_name`` / ``engine_options``: the engine and its knobs (a non-hf engine and its options are part of the
    run id, so its runs never mix with the transformers engine's).
    ``timing="batched"`` decodes an example's independent turns as one batch where the method allows it
    (scbench/batch.py; same predictions, batched cost columns); ``sequential`` decodes one turn at a time.
    A failure at any point, also before the model loads, leaves a run row with status ``failed`` and the error;
    except, with ``record_spec_errors=False`` (a single ``scbench run``), a refused spec when the store does not
    exist yet: a typo creates no store. A run the store holds as done returns at once (no model loads).
    ``strict``: a turn flagged ``unfired`` (the method's promise failed, scbench/checks.py) fails the run once stored.
    """
    from scbench.batch import replay_class

    engine_name = getattr(engine, "name", None) or engine_name
    spec_dict = run_spec_dict(spec, engine_name, engine_options)
    run_id = provenance.spec_hash(spec_dict)
    store = None
    try:
        picked = parse_shard(shard)
        replay_cls = replay_class(timing)
        method = check_spec(spec, engine_name, model=engine is None)  # all that is checkable without a model
        task = TASKS.get(spec.task).with_variant(spec.task_variant)
        if spec.model.get("device_map") not in (None, "", "null", "none") and method.sharded:
            raise ValueError(f"method {method.name!r} cannot run on a model split over devices (model.device_map): "
                             f"{method.sharded}")
        if engine is None and picked is None and finished(store_path, run_id):
            log.warning("run %s is done (every turn stored in %s): nothing to do", run_id, store_path)
            return run_id
        store = Store(store_path)  # a corrupt store or one of another schema fails here, before the model loads
        data = dict(spec.data)
        source = data.pop("source", "generated")
        examples = None
        if source != "generated":  # files and hub rows are read and checked before the model loads
            examples = task.prepare_examples(load_examples(task, source, **data), spec.max_turns)
        if engine is None:
            check_model_path(spec.model)  # after the store and the data files
            model = dict(spec.model, device=device) if device else spec.model
            engine = get_engine(model, engine_name, {**(engine_options or {}), **method.engine_args()})
        if examples is None:  # generated rows are sized in the model's tokens
            examples = load_examples(task, source, count=lambda t: len(engine.encode(t, add_special_tokens=False)), **data)
            examples = task.prepare_examples(examples, spec.max_turns)
    except Exception as e:
        if store is not None:
            store.close()
        if isinstance(e, StoreError):  # the store itself is the problem: nowhere to record it
            raise
        if isinstance(e, SpecError) and not record_spec_errors and not Path(store_path).exists():
            raise  # a typo in the spec creates no results store
        try:
            record_failure(store_path, run_id, spec_dict, e)
        except Exception as e2:  # noqa: BLE001 - never hide the job's own error behind a store problem
            log.error("could not record the failure of run %s in %s: %s", run_id, store_path, e2)
        raise
    mine = examples if picked is None else [ex for k, ex in enumerate(examples) if k % picked[1] == picked[0]]
    lease_key = shard_key(picked)

    try:
        owner = store.claim(run_id, lease_key)
        if owner is not None:
            log.warning("run %s%s: skipped, another process computes it (%s pid %s, heartbeat %.0f s ago)",
                        run_id, f" shard {shard}" if picked else "", owner["host"], owner["pid"],
                        time.time() - (owner["heartbeat"] or 0))
            return run_id
        store.open_run(run_id, model=engine.describe()["model"], method=method.name, method_label=method.label(),
                       task=task.name, mode=spec.mode, spec=spec_dict,
                       provenance=provenance.collect(engine.describe(), method.describe(), task))
        store.set_expected(run_id, {e.id: n_turns(e, spec) for e in examples})
        done = store.done_turns(run_id)
        total = sum(n_turns(e, spec) for e in mine)
        todo = total - sum(len(done.get(e.id, {})) for e in mine)
        flagged = {checks.UNFIRED: 0, checks.CAPPED: 0}
        bar = None
        if progress and todo:
            from tqdm import tqdm

            label = f"{task.name} {spec.mode} {method.name}" + (f" shard {shard}" if picked else "")
            bar = tqdm(total=total, initial=total - todo, desc=label, unit="turn")
        try:
            reset = getattr(engine, "reset_peak_memory", None)
            if reset is not None:  # the peak memory the turns record is this run's, not an earlier run's
                reset()
            warm = getattr(engine, "warmup", None)
            warmup_s = warm(method) if warm is not None and todo else 0.0  # one-time costs before the first turn
            for i, ex in enumerate(mine):
                have = done.get(ex.id, {})
                if len(have) >= n_turns(ex, spec):
                    continue
                if bar:
                    bar.set_postfix_str(f"example {i + 1}/{len(mine)}")
                replay = replay_cls(engine, method, task, ex, spec, done=have, warmup_s=warmup_s)
                warmup_s = 0.0
                for result in replay:
                    store.put(run_id, result)
                    flagged[checks.UNFIRED] += checks.has_flag(result.stats.flags, checks.UNFIRED)
                    flagged[checks.CAPPED] += checks.has_flag(result.stats.flags, checks.CAPPED)
                    if strict and checks.has_flag(result.stats.flags, checks.UNFIRED):
                        raise RuntimeError(f"strict: method {method.name} did not keep its promise on example "
                                           f"{result.example_id} turn {result.turn}: {result.stats.checks}")
                    if bar:
                        bar.update(1)
                if replay.mismatches:
                    store.note_mismatch(run_id, replay.mismatches)
        except BaseException as e:
            _record_stop(store, store_path, run_id, spec_dict, e)
            raise
        finally:
            if bar:
                bar.close()
        if flagged[checks.CAPPED]:
            log.warning("run %s: %d of %d turns stopped at the generation cap while the reference needs more tokens "
                        "(flagged capped; raise max_new_tokens)", run_id[:12], flagged[checks.CAPPED], todo)
        if flagged[checks.UNFIRED]:
            log.warning("run %s: %d of %d turns flagged unfired: the method did not do what it promises (see the "
                        "turns' checks; strict=true fails the run)", run_id[:12], flagged[checks.UNFIRED], todo)
        if picked is None:
            store.finish_run(run_id, "done")
        else:  # done only when every shard's rows are in (read after this shard's commits)
            store.finish_run(run_id, "done" if store.complete(run_id) else "partial")
    finally:
        try:
            store.release(run_id, lease_key)
        except Exception:  # noqa: BLE001 - a store that fails here already failed the run; the owner's exit frees it
            log.warning("could not release the lease of run %s in %s", run_id, store_path)
        store.close()
    return run_id
