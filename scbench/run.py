"""Run one RunSpec end to end: validate, load data and model, replay, store every finished turn."""
from __future__ import annotations

import dataclasses
import logging
import traceback
from pathlib import Path

from scbench import provenance
from scbench.data import load_examples
from scbench.records import RunSpec
from scbench.registry import ENGINES, TASKS
from scbench.runner import Replay, n_turns
from scbench.store import Store
from scbench.validate import SpecError, check_method, check_spec

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


def run_spec_dict(spec: RunSpec, engine_name: str = "hf", engine_options: dict | None = None) -> dict:
    """What a run's id hashes: the spec, plus the engine and its non-resource knobs for an engine other than hf
    (another engine's run is another run; hf runs keep their ids)."""
    spec_dict = dataclasses.asdict(spec)
    if engine_name != "hf":
        spec_dict["engine"] = {"name": engine_name,
                               **{k: v for k, v in (engine_options or {}).items() if k not in RESOURCE_OPTIONS}}
    return spec_dict


def run_id_of(spec: RunSpec, engine_name: str = "hf", engine_options: dict | None = None) -> str:
    """The id ``run_spec`` stores ``spec`` under (resume and merge find runs by it)."""
    return provenance.spec_hash(run_spec_dict(spec, engine_name, engine_options))


def run_spec(spec: RunSpec, store_path: str, *, engine=None, engine_name: str = "hf", progress: bool = True,
             shard: str | None = None, device: str | None = None, engine_options: dict | None = None,
             record_spec_errors: bool = True) -> str:
    """Run (or resume) ``spec``; returns the run id. Validates everything before loading a model.

    ``shard="i/n"`` processes only the examples whose index % n == i; shards share the run id (the shard is
    not part of the spec) and write disjoint (example, turn) rows. The run is marked ``done`` once every
    example of the whole run is stored, ``partial`` when this shard finished and others have not.
    ``device`` overrides the model's device without changing the run id (one job per GPU).
    ``engine_name`` / ``engine_options``: the engine and its knobs (a non-hf engine and its options are part of the
    run id, so its runs never mix with the transformers engine's).
    A failure at any point, also before the model loads, leaves a run row with status ``failed`` and the error;
    except, with ``record_spec_errors=False`` (a single ``scbench run``), a refused spec when the store does not
    exist yet: a typo creates no store.
    """
    engine_name = getattr(engine, "name", None) or engine_name
    spec_dict = run_spec_dict(spec, engine_name, engine_options)
    run_id = provenance.spec_hash(spec_dict)
    try:
        picked = parse_shard(shard)
        method = check_spec(spec, engine_name, model=engine is None)  # all that is checkable without a model
        task = TASKS.get(spec.task).with_variant(spec.task_variant)
        if engine is None and picked is None and finished(store_path, run_id):
            log.warning("run %s is done (every turn stored in %s): nothing to do", run_id, store_path)
            return run_id
        if engine is None:
            model = dict(spec.model, device=device) if device else spec.model
            engine = get_engine(model, engine_name, {**(engine_options or {}), **method.engine_args()})
        data = dict(spec.data)
        source = data.pop("source", "generated")
        examples = load_examples(task, source, count=lambda t: len(engine.encode(t, add_special_tokens=False)), **data)
        examples = task.prepare_examples(examples, spec.max_turns)
    except Exception as e:
        if isinstance(e, SpecError) and not record_spec_errors and not Path(store_path).exists():
            raise  # a typo in the spec creates no results store
        try:
            record_failure(store_path, run_id, spec_dict, e)
        except Exception:  # noqa: BLE001 - never hide the job's own error behind a store problem
            log.exception("could not record the failure of run %s in %s", run_id, store_path)
        raise
    mine = examples if picked is None else [ex for k, ex in enumerate(examples) if k % picked[1] == picked[0]]

    store = Store(store_path)
    try:
        store.open_run(run_id, model=engine.describe()["model"], method=method.name, method_label=method.label(),
                       task=task.name, mode=spec.mode, spec=spec_dict,
                       provenance=provenance.collect(engine.describe(), method.describe(), task))
        done = store.done_turns(run_id)
        total = sum(n_turns(e, spec) for e in mine)
        todo = total - sum(len(done.get(e.id, {})) for e in mine)
        bar = None
        if progress and todo:
            from tqdm import tqdm

            label = f"{task.name} {spec.mode} {method.name}" + (f" shard {shard}" if picked else "")
            bar = tqdm(total=total, initial=total - todo, desc=label, unit="turn")
        try:
            for i, ex in enumerate(mine):
                have = done.get(ex.id, {})
                if len(have) >= n_turns(ex, spec):
                    continue
                if bar:
                    bar.set_postfix_str(f"example {i + 1}/{len(mine)}")
                for result in Replay(engine, method, task, ex, spec, done=have):
                    store.put(run_id, result)
                    if bar:
                        bar.update(1)
        except BaseException as e:
            store.finish_run(run_id, "failed", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")
            raise
        finally:
            if bar:
                bar.close()
        if picked is None:
            store.finish_run(run_id, "done")
        else:  # done only when every shard's rows are in (read after this shard's commits)
            store.set_expected(run_id, {e.id: n_turns(e, spec) for e in examples})
            store.finish_run(run_id, "done" if store.complete(run_id) else "partial")
    finally:
        store.close()
    return run_id
