"""Run one RunSpec end to end: validate, load data and model, replay, store every finished turn."""
from __future__ import annotations

import dataclasses
import logging
import traceback

from scbench import provenance
from scbench.data import load_examples
from scbench.records import RunSpec
from scbench.registry import METHODS, TASKS
from scbench.runner import Replay, n_turns
from scbench.store import Store

log = logging.getLogger(__name__)

_ENGINES: dict[str, object] = {}


def build_method(cfg: dict):
    """Method instance from ``{name: ..., knob: value}``; unknown names and knobs get clear errors."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name is None:
        raise ValueError("method config needs a 'name'")
    cls = METHODS.get(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - fields)
    if unknown:
        raise ValueError(f"method {name!r} has no knob(s) {', '.join(unknown)}; its knobs: {', '.join(sorted(fields)) or 'none'}")
    return cls(**cfg)


def get_engine(model: dict, engine: str = "hf"):
    """One engine per model config per process (Hydra multirun jobs share it)."""
    key = repr(sorted(model.items())) + engine
    if key not in _ENGINES:
        if engine != "hf":
            raise ValueError(f"engine {engine!r} is not available; engines: hf")
        from scbench.engines.hf import HFEngine

        m = dict(model)
        _ENGINES[key] = HFEngine(
            m.pop("path"), name=m.pop("name", None), device=m.pop("device", None), dtype=m.pop("dtype", None),
            window=m.pop("window", None), trust_remote_code=m.pop("trust_remote_code", False),
            adapter=m.pop("adapter", None),
        )
        if m:
            raise ValueError(f"unknown model config key(s): {', '.join(sorted(m))}")
    return _ENGINES[key]


def run_spec(spec: RunSpec, store_path: str, *, engine=None, engine_name: str = "hf", progress: bool = True) -> str:
    """Run (or resume) ``spec``; returns the run id. Validates everything before loading a model."""
    spec.validate()
    task = TASKS.get(spec.task).with_variant(spec.task_variant)
    method = build_method(spec.method)
    if engine_name not in method.engines:
        raise ValueError(f"method {method.name!r} runs on engines {', '.join(method.engines)}, not {engine_name!r}")
    spec_dict = dataclasses.asdict(spec)
    run_id = provenance.spec_hash(spec_dict)
    engine = engine or get_engine(spec.model, engine_name)
    data = dict(spec.data)
    source = data.pop("source", "generated")
    examples = load_examples(task, source, count=lambda t: len(engine.encode(t, add_special_tokens=False)), **data)

    store = Store(store_path)
    try:
        store.open_run(run_id, model=engine.describe()["model"], method=method.name, method_label=method.label(),
                       task=task.name, mode=spec.mode, spec=spec_dict,
                       provenance=provenance.collect(engine.describe(), method.describe(), task))
        done = store.done_turns(run_id)
        total = sum(n_turns(e, spec) for e in examples)
        todo = total - sum(len(v) for v in done.values())
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=total - todo, desc=f"{task.name} {spec.mode} {method.name}", unit="turn")
        try:
            for i, ex in enumerate(examples):
                have = done.get(ex.id, {})
                if len(have) >= n_turns(ex, spec):
                    continue
                if bar:
                    bar.set_postfix_str(f"example {i + 1}/{len(examples)}")
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
        store.finish_run(run_id, "done")
    finally:
        store.close()
    return run_id
