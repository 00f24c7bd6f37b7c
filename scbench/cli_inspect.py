"""``scbench ls`` and ``scbench show``: what is registered, what a store holds, and one run's turns."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from scbench.overrides import _method_name, _root_defaults, config_file, group_choices


def open_existing(path: str):
    """The store at ``path``, read-only; a FileNotFoundError (nothing created) when there is none."""
    from scbench.store import Store

    if not Path(path).exists():
        raise FileNotFoundError(f"no results store at {path} (scbench run writes one; --store PATH picks another)")
    return Store(path, readonly=True)


def ls_methods() -> None:
    """Each method's stages, engines and knobs (defaults) read from its source, and its configs; no torch."""
    from scbench.introspect import describe_method
    from scbench.registry import METHODS

    configs: dict[str, list[str]] = {}
    for c in group_choices("method"):
        configs.setdefault(_method_name(c), []).append(c)
    for name in METHODS.names():
        d = describe_method(METHODS, name)
        knobs = " ".join(f"{k}={v}" for k, v in d["knobs"].items()) or "-"
        print(f"{name:20s} stages={','.join(d['stages']) or '-':22s} engines={','.join(d['engines']):8s} "
              f"configs: {', '.join(configs.get(name, [])) or '-'}")
        print(f"{'':20s} knobs: {knobs}")


def cmd_ls(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="scbench ls")
    p.add_argument("what", choices=["tasks", "methods", "models", "runs"])
    p.add_argument("--store", default="results/scbench.sqlite")
    a = p.parse_args(argv)
    if a.what == "tasks":
        from scbench.registry import TASKS

        for name in TASKS.names():
            t = TASKS.get(name)
            limits = getattr(t, "turn_tokens", None) or {name: t.max_new_tokens}
            limit_text = ",".join(f"{k.removeprefix('scbench_')}:{v}" for k, v in limits.items())
            metrics = ",".join(getattr(t, "metrics", None) or (t.metric,))
            print(f"{name:30s} {t.category:20s} metric={metrics:16s} max_new={limit_text:26s} "
                  f"variants={','.join(t.variants)}")
            print(f"{'':30s} offline data: {t.offline_source}")
    elif a.what == "methods":
        ls_methods()
    elif a.what == "models":
        from omegaconf import OmegaConf

        default = OmegaConf.load(config_file("", "config")).defaults[0]["model"]
        for c in group_choices("model"):
            cfg = OmegaConf.load(config_file("model", c))
            print(f"{c:28s} {cfg.path}" + (f" + {cfg.adapter}" if cfg.get("adapter") else "")
                  + ("   (default)" if c == default else ""))
    else:
        from scbench.report.summary import runs_listing

        store = open_existing(a.store)
        try:
            print(runs_listing(store, _root_defaults(), note=owner_note))
        finally:
            store.close()


def cmd_show(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="scbench show", description="One run's turns: question, prediction, reference, "
                                "score and costs (long texts elided).")
    p.add_argument("run", help="run id or unique prefix (scbench ls runs)")
    p.add_argument("--store", default="results/scbench.sqlite")
    p.add_argument("--example", type=int, default=None, help="0-based example index")
    p.add_argument("--turn", type=int, default=None, help="1-based turn number")
    p.add_argument("--width", type=int, default=400, help="characters kept of each text (the middle is elided)")
    a = p.parse_args(argv)
    from scbench.report.samples import show

    store = open_existing(a.store)
    try:
        print(show(store, a.run, a.example, a.turn, a.width))
    finally:
        store.close()


def owner_note(run: dict) -> str:
    """``owner=host:pid heartbeat 12s ago`` for a running or interrupted run that has a lease row."""
    o = run.get("owner")
    if not o or run["status"] not in ("running", "interrupted"):
        return ""
    return f"owner={o['host']}:{o['pid']} heartbeat {time.time() - (o['heartbeat'] or 0):.0f}s ago"
