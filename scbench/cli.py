"""Command line: ``scbench run | ls | score | export | plot | merge | data generate``. Thin: imports happen inside commands.

``run`` is a Hydra app (config groups model/, method/, task/, mode/, sweep/; ``-m`` for sweeps); the
others take plain flags. Unknown group choices are refused before Hydra starts, with the closest match.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from scbench.overrides import (  # noqa: F401 - re-exported (tests and scripts import them from here)
    GROUPS, _method_name, _root_defaults, check_overrides, config_dir, config_file, config_roots, group_choices,
)
USER_ERRORS = (ValueError, KeyError, FileNotFoundError)


# --- run ----------------------------------------------------------------------------------------------
def spec_from_cfg(cfg):
    from omegaconf import OmegaConf

    from scbench.records import RunSpec

    c = OmegaConf.to_container(cfg, resolve=True)
    return RunSpec(
        model=c["model"], method=c["method"], task=c["task"]["name"], task_variant=c["task"].get("variant"),
        mode=c["mode"]["name"], data=c["data"], max_turns=c["max_turns"], max_seq_length=c["max_seq_length"],
        max_new_tokens=c["max_new_tokens"], compress=c["policy"]["compress"],
        decode_interval=c["policy"].get("decode_interval", 64), decode_cap=c["policy"].get("decode_cap"),
        query_visible=c["policy"]["query_visible"], sparse_prefill=c["policy"]["sparse_prefill"],
        truncation=c["policy"].get("truncation", "reference"),
        golden_context=c["golden_context"], bos=c["bos"], reuse=c["reuse"],
    )


def engine_cfg(cfg) -> dict:
    """The engine group (``engine=vllm``: ``{name: vllm, ...options}``); a plain ``engine: hf`` string also works."""
    from omegaconf import OmegaConf

    eng = cfg.get("engine", "hf")
    return OmegaConf.to_container(eng, resolve=True) if OmegaConf.is_config(eng) else {"name": str(eng)}


def job_device(job_num: int | None, n_devices: int, enabled: bool) -> str | None:
    """The CUDA device a sweep job is pinned to: ``cuda:{job_num % n_devices}`` when pinning is on, this is a
    multirun job and more than one device is visible; None (the model config decides) otherwise."""
    if not enabled or job_num is None or n_devices <= 1:
        return None
    return f"cuda:{int(job_num) % n_devices}"


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch/CUDA means no pinning
        return 0


def _failed_spec_dict(cfg) -> dict:
    """Best-effort spec of a job whose config did not even make a RunSpec (for its failed run row)."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=False)
    c.pop("hydra", None)
    task = c.get("task")
    mode = c.get("mode")
    return {"model": c.get("model"), "method": c.get("method"),
            "task": task.get("name") if isinstance(task, dict) else task,
            "mode": mode.get("name") if isinstance(mode, dict) else mode, "config": c}


def _run_job(cfg) -> None:
    """One Hydra job. In a sweep a failing job (bad config, OOM, any exception) is recorded in the store as a
    failed run with its error and the sweep goes on; a single run raises."""
    from hydra.core.hydra_config import HydraConfig

    from scbench import group
    from scbench.run import record_failure, run_spec
    from scbench.provenance import spec_hash

    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    job_num = hc.job.get("num") if multirun else None
    spec = None
    try:
        spec = spec_from_cfg(cfg)
        device = job_device(job_num, _visible_gpus(), bool(cfg.get("pin_gpu", False)))
        engine = engine_cfg(cfg)
        timing = cfg.get("timing", "batched")
        if multirun and group.should_defer(hc, cfg):  # run at the end of the sweep, sharing prefills (scbench/group.py)
            overrides = list(hc.overrides.task)
            group.QUEUE.append(group.Job(spec, cfg.store, engine.pop("name"), engine, cfg.get("shard"), device,
                                         cfg.progress, timing,
                                         on_error=lambda e: _note_failure(job_num, overrides, e)))
            from scbench.run import run_id_of

            FINISHED.append((str(cfg.store), run_id_of(spec, group.QUEUE[-1].engine_name, engine)))
            return
        run_id = run_spec(spec, cfg.store, engine_name=engine.pop("name"), engine_options=engine,
                          progress=cfg.progress, shard=cfg.get("shard"), device=device, timing=timing,
                          record_spec_errors=multirun, strict=bool(cfg.get("strict", False)))
        print(f"run {run_id}: {spec.task} {spec.mode} {spec.method['name']}"
              + (f" shard {cfg.shard}" if cfg.get("shard") else "") + (f" on {device}" if device else "")
              + f" -> {cfg.store}")
        FINISHED.append((str(cfg.store), run_id))
    except Exception as e:  # noqa: BLE001 - a sweep must survive any one job
        if not multirun:
            if isinstance(e, USER_ERRORS):  # one line (and the fix), no traceback, no Hydra folder left behind
                msg = e.args[0] if isinstance(e, KeyError) and e.args else e
                print(f"scbench run: error: {msg}", file=sys.stderr)
                if not Path(str(cfg.store)).exists():
                    _drop_output_dir(hc.runtime.output_dir)
                sys.exit(2)
            raise
        if spec is None:  # failed before a RunSpec existed: record it under a hash of the raw config
            try:
                d = _failed_spec_dict(cfg)
                record_failure(cfg.store, "cfg-" + spec_hash(d)[:11], d, e)
            except Exception:  # noqa: BLE001
                logging.getLogger("scbench").exception("could not record the failure in %s", cfg.get("store"))
        else:  # run_spec recorded it: the sweep's table lists it as failed
            from scbench.run import run_id_of

            eng = engine_cfg(cfg)
            FINISHED.append((str(cfg.store), run_id_of(spec, eng.pop("name"), eng)))
        from scbench.devices import free_cached_memory

        free_cached_memory()
        logging.getLogger("scbench").error("job %s failed: %s: %s", job_num, type(e).__name__, e)
        _note_failure(job_num, list(hc.overrides.task), e)


FAILURES_ENV = "SCBENCH_SWEEP_FAILURES"
"""A file the sweep's jobs append their failures to (jobs may run in other processes: joblib, submitit)."""
_FAILED: list[dict] = []


def _note_failure(job_num, overrides: list[str], error: BaseException) -> None:
    import json

    rec = {"job": job_num, "overrides": " ".join(overrides), "error": f"{type(error).__name__}: {error}"}
    _FAILED.append(rec)
    path = os.environ.get(FAILURES_ENV)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
        except OSError:  # the in-process list still has it (basic launcher)
            pass


def _sweep_failures(path: str) -> list[dict]:
    import json

    seen = {(f["job"], f["overrides"]): f for f in _FAILED}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    f = json.loads(line)
                    seen.setdefault((f["job"], f["overrides"]), f)
    except (OSError, ValueError):
        pass
    return sorted(seen.values(), key=lambda f: (f["job"] is None, f["job"] or 0))


def _drop_output_dir(path) -> None:
    """Remove the Hydra output folder of a run refused before it started (and its parent when left empty)."""
    import shutil

    logging.shutdown()  # Hydra's job log file is open in it
    folder = Path(str(path))
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):  # <store dir>/hydra, then the store dir: when empty
        if parent.name != "hydra" and parent.resolve() not in _NEW_DIRS:
            break  # the store folder existed before this command
        try:
            parent.rmdir()
        except OSError:
            break




_NEW_DIRS: set[Path] = set()
"""Folders that did not exist when ``scbench run`` started (removed again when a refused run leaves them empty)."""
FINISHED: list[tuple[str, str]] = []
"""(store, run id) of every job this process ran (the end-of-run / end-of-sweep table)."""


def cmd_run(argv: list[str]) -> None:
    import hydra

    import tempfile

    from scbench.plugins import add_plugin_dir, config_dirs

    argv = list(argv)
    for arg in argv:
        if arg.startswith("plugins=") and arg.partition("=")[2] not in ("", "null"):
            add_plugin_dir(arg.partition("=")[2])  # also for sweep workers (they inherit the environment)
    extra = config_dirs()
    if extra and not any(a.startswith("hydra.searchpath") for a in argv):
        argv.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in extra) + "]")
    check_overrides(argv)
    store = next((a.partition("=")[2] for a in argv if a.startswith("store=")), "results/scbench.sqlite")
    _NEW_DIRS.clear()
    _NEW_DIRS.update(p.resolve() for p in [Path(store).parent, *Path(store).parent.parents] if not p.exists())
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")(_run_job)
    sys.argv = ["scbench run", *argv]
    fd, path = tempfile.mkstemp(prefix="scbench-failures-", suffix=".jsonl")
    os.close(fd)
    os.environ[FAILURES_ENV] = path
    _FAILED.clear()
    FINISHED.clear()
    try:
        app()
        failed = _sweep_failures(path)
    finally:
        os.environ.pop(FAILURES_ENV, None)
        Path(path).unlink(missing_ok=True)  # a finished sweep never fails on its scratch file
    print_summary(FINISHED)
    if not FINISHED and ("-m" in argv or "--multirun" in argv):  # jobs ran in other processes (joblib, submitit)
        print(f"\nthe sweep's runs: scbench ls runs --store {store}")
    if failed:  # a sweep with failed jobs fails, and says which
        print(f"scbench run: {len(failed)} job(s) failed:", file=sys.stderr)
        swept = {a.partition("=")[0].lstrip("+~") for a in argv if "," in a.partition("=")[2] or a.startswith("~")}
        for f in failed:
            shown = [o for o in f["overrides"].split() if o.partition("=")[0].lstrip("+~") in swept] or [f["overrides"]]
            print(f"  job {f['job']} ({' '.join(shown)}): {f['error'].splitlines()[0] if f['error'] else '?'}",
                  file=sys.stderr)
        sys.exit(1)


def print_summary(finished: list[tuple[str, str]]) -> None:
    """The end-of-run (or end-of-sweep) table of the runs this process ran, per store."""
    from scbench.report.summary import summary_table
    from scbench.store import Store

    for path in dict.fromkeys(p for p, _ in finished):
        if not Path(path).exists():
            continue
        store = Store(path, readonly=True)
        try:
            print("\n" + summary_table(store, list(dict.fromkeys(r for p, r in finished if p == path))))
        finally:
            store.close()


# --- data generate -------------------------------------------------------------------------------
def cmd_data(argv: list[str]) -> None:
    """``scbench data generate task=scbench_kv length=16000 n=20 turns=5 seed=0 out=data/``"""
    usage = "usage: scbench data generate task=NAME length=TOKENS n=ROWS [turns=5 seed=0 out=data/ model=smollm2-135m|none]"
    if argv and argv[0] in ("-h", "--help") or argv[1:2] in (["-h"], ["--help"]):
        print(usage + "\n  writes OUT/<task>.jsonl rows in the official schema (use with data.source=local data.path=OUT)")
        return
    if not argv or argv[0] != "generate":
        raise ValueError(usage)
    from omegaconf import OmegaConf

    from scbench.data import generate_rows, write_jsonl
    from scbench.registry import TASKS

    opts = {"length": 2000, "n": 5, "turns": 5, "seed": 0, "out": "data", "model": "smollm2-135m"}
    keys = ["task", *opts]
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key not in keys:
            from scbench.validate import SpecError, did_you_mean

            raise SpecError(f"data generate: unexpected argument {arg!r}",
                            f"{did_you_mean(key, keys)}keys: {', '.join(keys)}")
        opts[key] = value
    if "task" not in opts:
        raise ValueError("data generate needs task=NAME")
    names = opts["task"].split(",")
    for name in names:
        TASKS.check(name)
    try:
        length, n, turns, seed = (int(opts[k]) for k in ("length", "n", "turns", "seed"))
    except ValueError:
        raise ValueError("data generate: length, n, turns and seed must be integers") from None
    count = None
    if opts["model"] != "none":  # count tokens with the model's tokenizer (lengths are in its tokens)
        from transformers import AutoTokenizer

        from scbench.engines.models import resolve

        model_cfg = OmegaConf.load(config_file("model", opts["model"]))
        tok = AutoTokenizer.from_pretrained(resolve(model_cfg.path))
        count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    for name in names:
        rows = generate_rows(TASKS.get(name), n, length, turns, seed, count)
        path = write_jsonl(rows, Path(opts["out"]) / f"{name}.jsonl")
        print(f"wrote {len(rows)} rows to {path}")


# --- ls / show (scbench/cli_inspect.py); score / export / plot / merge (scbench/cli_report.py) ----------------
def cmd_ls(argv: list[str]) -> None:
    from scbench.cli_inspect import cmd_ls as run

    run(argv)


def cmd_show(argv: list[str]) -> None:
    from scbench.cli_inspect import cmd_show as run

    run(argv)


def cmd_score(argv: list[str]) -> None:
    from scbench.cli_report import cmd_score as run

    run(argv)


def cmd_export(argv: list[str]) -> None:
    from scbench.cli_report import cmd_export as run

    run(argv)


def cmd_plot(argv: list[str]) -> None:
    from scbench.cli_report import cmd_plot as run

    run(argv)


def cmd_merge(argv: list[str]) -> None:
    from scbench.cli_report import cmd_merge as run

    run(argv)


COMMANDS = {"run": cmd_run, "ls": cmd_ls, "show": cmd_show, "score": cmd_score, "export": cmd_export,
            "plot": cmd_plot, "merge": cmd_merge, "data": cmd_data}
USAGE = """usage: scbench {run|ls|show|score|export|plot|merge|data} ...
  scbench run method=streamingllm task=scbench_kv mode=multi_turn method.n_local=1024
  scbench run -m method=full,streamingllm task=scbench_kv,scbench_vt
  scbench ls tasks|methods|models|runs    scbench show RUN [--example N] [--turn T]    scbench score RUN
  scbench export --format md|csv|json|jsonl|html    scbench export --samples --format jsonl
  scbench plot --out DIR    scbench merge OUT.sqlite IN1.sqlite IN2.sqlite ...
  scbench data generate task=scbench_kv length=16000 n=20 out=data/"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        from scbench.validate import did_you_mean

        hint = did_you_mean(argv[0], COMMANDS)
        print(f"scbench: unknown command {argv[0]!r}. {hint[:1].upper() + hint[1:]}\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    level = os.environ.get("SCBENCH_LOG_LEVEL", "WARNING").upper()  # INFO: e.g. a grouped sweep's memory per run
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), format="%(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[argv[0]](argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:  # `scbench export | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"scbench {argv[0]}: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
