"""The vLLM engine: (method, engine) checks, option validation, and, where the vLLM environment exists, the golden
cross-engine test (same greedy predictions, scores and prompt lengths as the transformers engine on the probe
model, both modes, kv and vt), prefix-cache hits, and no vLLM process outliving a run (normal end, error, Ctrl-C).

vLLM lives in its own environment (`make vllm-env` builds .venv-vllm; its pins clash with ours), so the vLLM side
runs `scbench run engine=vllm` there in a subprocess. Without that environment these tests skip with the reason,
unless SCBENCH_VLLM_PYTHON names it (as `make test` does) or CI=true: then a missing or broken one fails.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scbench.run import get_engine, run_spec
from support import disk_skip_reason
from scbench.records import RunSpec
from scbench.store import Store

ROOT = Path(__file__).resolve().parents[2]
PROBE = {"name": "smollm2-135m-probe", "path": "embedded:smollm2", "adapter": "models/smollm2-135m-probe",
         "dtype": "auto", "device": "auto", "window": 8192}


def spec(**kw) -> RunSpec:
    base = dict(model=PROBE, method={"name": "full"}, task="scbench_kv", mode="multi_turn",
                data={"source": "generated", "n": 1, "length": 600, "turns": 2, "seed": 0})
    return RunSpec(**{**base, **kw})


# --- no vLLM needed -----------------------------------------------------------------------------------
def test_unsupported_method_engine_pair_fails_before_loading(tmp_path, monkeypatch):
    import scbench.run as ev

    monkeypatch.setattr(ev, "get_engine", lambda *a, **k: pytest.fail("a model was loaded"))
    db = str(tmp_path / "s.sqlite")
    with pytest.raises(ValueError, match=r"'vllm_kv_quant' runs on engines vllm, not 'hf'"):
        run_spec(spec(method={"name": "vllm_kv_quant"}), db, progress=False)
    with pytest.raises(ValueError, match=r"'streamingllm' runs on engines hf, not 'vllm'"):
        run_spec(spec(method={"name": "streamingllm", "n_init": 4, "n_local": 16}), db, engine_name="vllm",
                 engine_options={"tensor_parallel_size": 1, "gpu_memory_utilization": 0.5}, progress=False)
    runs = Store(db).runs()
    assert [r["status"] for r in runs] == ["failed", "failed"]
    specs = [json.loads(r["spec"]) for r in runs]
    # an hf run keeps its plain spec (and id); another engine and its result-relevant options join the run id
    assert "engine" not in specs[0]
    assert specs[1]["engine"] == {"name": "vllm", "tensor_parallel_size": 1}


def test_unknown_engine_and_options_are_refused():
    with pytest.raises(ValueError, match="engines: hf, vllm"):
        get_engine(PROBE, "sglang")
    with pytest.raises(ValueError, match="engine hf takes no engine options"):
        get_engine(PROBE, "hf", {"kv_cache_dtype": "fp8"})
    with pytest.raises(ValueError, match="prefill_chunk"):
        get_engine({**PROBE, "prefill_chunk": 64}, "vllm")


def test_kv_cache_dtype_checks():
    from scbench.engines.vllm import check_kv_cache_dtype
    from scbench.methods.vllm_kv_quant import VLLMKVQuant

    check_kv_cache_dtype("auto", on_cpu=True, flags=set())
    check_kv_cache_dtype("fp8", on_cpu=True, flags={"avx512f"})
    check_kv_cache_dtype("fp8_e5m2", on_cpu=False, flags=set())
    with pytest.raises(ValueError, match="AVX-512 or AMX"):
        check_kv_cache_dtype("fp8", on_cpu=True, flags={"avx2"})
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        check_kv_cache_dtype("int4", on_cpu=False, flags=set())
    assert VLLMKVQuant().engine_args() == {"kv_cache_dtype": "fp8"}
    with pytest.raises(ValueError, match="VLLMKVQuant.kv_cache_dtype"):
        VLLMKVQuant(kv_cache_dtype="int8")


def test_engine_is_a_config_group():
    from hydra import compose, initialize_config_dir

    from scbench.cli import check_overrides, config_dir, engine_cfg
    from scbench.registry import UnknownName

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        assert engine_cfg(compose("config")) == {"name": "hf"}
        cfg = engine_cfg(compose("config", overrides=["engine=vllm", "engine.max_model_len=4096"]))
    assert cfg["name"] == "vllm" and cfg["max_model_len"] == 4096
    from scbench.engines.vllm import OPTIONS

    assert set(cfg) - {"name"} == set(OPTIONS)
    with pytest.raises(UnknownName, match="vllm"):
        check_overrides(["engine=vlm"])


def test_missing_vllm_is_a_clear_error():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="make vllm-env"):
            get_engine(PROBE, "vllm")
    else:
        pytest.skip("vllm is importable here")


def test_unavailable_cost_column_is_null_not_a_guess(tmp_path):
    """An engine that cannot measure a column (vLLM on GPU: peak memory) stores null; reports show it as missing."""
    from scbench.records import TurnResult, TurnStats
    from scbench.report.export import records
    from scbench.report.table import leaderboard, to_markdown

    store = Store(tmp_path / "s.sqlite")
    store.open_run("r1", model="m", method="full", method_label="full", task="scbench_kv", mode="multi_turn",
                   spec={"method": {"name": "full"}},
                   provenance={"engine": {"engine": "vllm", "unavailable": ["peak_mem_bytes"]}})
    stats = TurnStats(prompt_tokens=10, prefill_computed=10, kv_bytes=100, kv_full_bytes=100, peak_mem_bytes=None)
    store.put("r1", TurnResult("e0", 0, 10, "x", {"answer": "x"}, {"kv": 1.0}, stats))
    store.finish_run("r1")  # unfinished runs stay out of the board
    assert store.turns()[0]["peak_mem_bytes"] is None
    assert records(store)[0]["costs"]["peak_mem_bytes"] is None
    header, _, row = to_markdown(leaderboard(store)).splitlines()[:3]
    assert header.endswith("| peak MiB (max/turn) |") and row.endswith("| - |")
    store.close()


# --- the vLLM environment -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_python() -> str:
    named = os.environ.get("SCBENCH_VLLM_PYTHON")
    python = Path(named or ROOT / ".venv-vllm" / "bin" / "python")
    required = bool(named) or os.environ.get("CI") == "true"
    probe = None
    if python.exists():
        probe = subprocess.run([str(python), "-c", "import vllm, scbench.engines.vllm"], capture_output=True, text=True)
    if probe is None and (reason := disk_skip_reason(python)):
        pytest.skip(reason)
    if probe is None or probe.returncode:
        why = (f"no vLLM environment at {python}" if probe is None
               else f"{python} cannot import vllm: {probe.stderr[-2000:]}")
        if required:
            pytest.fail(f"{why} (`make vllm-env` builds it; SCBENCH_VLLM_PYTHON or CI=true make it required)")
        pytest.skip(f"{why}: `make vllm-env` builds .venv-vllm (SCBENCH_VLLM_PYTHON names another)")
    return str(python)


def vllm_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1"}


def session_alive(sid: int) -> list[str]:
    """Processes of session ``sid`` still alive (name and pid): vLLM's processes inherit the run's session."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1: text.rindex(")")], text[text.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            alive.append(f"{name}:{stat.parent.name}")
    return alive


def assert_no_survivor(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert session_alive(proc.pid) == [], "vLLM processes outlived the run"


def _default_sigint() -> None:
    """In the child: Ctrl-C raises KeyboardInterrupt even where the test process was started with SIGINT ignored
    (any background job of a shell without job control, e.g. `.ci/run &`), which the child would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def scbench_vllm(python: str, args: list[str], log: Path, multirun: bool = False) -> subprocess.Popen:
    """``scbench run engine=vllm ARGS`` in the vLLM environment, in a session of its own, output to ``log``."""
    run = ["run", "-m"] if multirun else ["run"]
    with open(log, "w") as out:  # a file, not a pipe: vLLM logs a lot and nobody reads a pipe while we wait
        return subprocess.Popen([python, "-m", "scbench.cli", *run, "engine=vllm", "engine.cpu_kvcache_space_gib=1",
                                 *args], cwd=ROOT, env=vllm_env(), start_new_session=True, preexec_fn=_default_sigint, stdout=out,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # leave nothing running behind a failed test
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return log.read_text(errors="replace")


PARITY = ["model=smollm2-135m-probe", "method=full", "task=scbench_kv,scbench_vt", "mode=multi_turn,multi_request",
          "data.n=1", "data.length=600", "data.turns=3", "max_new_tokens=32", "progress=false"]


def rows(db) -> dict:
    store = Store(db)
    runs = {r["run_id"]: r for r in store.runs()}
    out = {(runs[t["run_id"]]["task"], runs[t["run_id"]]["mode"], t["example_id"], t["turn"]): t for t in store.turns()}
    engines = {json.loads(r["provenance"])["engine"]["engine"] for r in runs.values()}
    store.close()
    return out, engines


@pytest.fixture(scope="module")
def parity(vllm_python, tmp_path_factory):
    from scbench.cli import main

    tmp = tmp_path_factory.mktemp("parity")
    proc = scbench_vllm(vllm_python, [*PARITY, f"store={tmp / 'vllm.sqlite'}", f"hydra.sweep.dir={tmp}/hv"],
                        tmp / "vllm.log", multirun=True)
    log = finish(proc, tmp / "vllm.log", 1800)
    assert proc.returncode == 0, log[-4000:]
    assert_no_survivor(proc)  # normal end
    main(["run", "-m", "engine=hf", *PARITY, f"store={tmp / 'hf.sqlite'}", f"hydra.sweep.dir={tmp}/hh"])
    return rows(tmp / "vllm.sqlite"), rows(tmp / "hf.sqlite")


@pytest.mark.slow
def test_vllm_matches_transformers_token_for_token(parity):
    (vl, vl_engines), (hf, hf_engines) = parity
    assert vl_engines == {"vllm"} and hf_engines == {"hf"}
    assert set(vl) == set(hf) and len(hf) == 2 * 2 * 3
    for key in sorted(hf):
        a, b = vl[key], hf[key]
        assert (a["prompt_tokens"], a["prediction"], a["decode_tokens"], a["kv_tokens"]) == \
            (b["prompt_tokens"], b["prediction"], b["decode_tokens"], b["kv_tokens"]), key
        assert a["scores"] == b["scores"], key
    assert any(s > 0 for t in hf.values() for s in t["scores"].values())  # the comparison has something to agree on


@pytest.mark.slow
def test_vllm_costs_come_from_its_prefix_cache(parity):
    (vl, _), _ = parity
    served = {}
    for (task, mode, ex, turn), t in sorted(vl.items()):
        block = 128  # the CPU backend's block size (describe()["block_size"])
        assert t["prefill_reused"] % block == 0 and t["prefill_reused"] <= t["prompt_tokens"]
        assert t["prefill_reused"] + t["prefill_computed"] >= t["prompt_tokens"]
        assert t["ttft_s"] > 0 and t["kv_bytes"] >= t["kv_full_bytes"] > 0 and t["peak_mem_bytes"] > 0
        if turn == 0:  # every example starts cold
            assert t["prefill_reused"] == 0
        elif mode == "multi_turn":  # the whole previous prompt is served, but for its partly filled last block
            assert t["prefill_reused"] >= vl[(task, mode, ex, turn - 1)]["prompt_tokens"] // block * block
        else:  # every request after the first is served the context (whole blocks)
            served.setdefault((task, ex), t["prefill_reused"])
            assert t["prefill_reused"] == served[(task, ex)] > 0


@pytest.mark.slow
def test_no_vllm_process_survives_an_error(vllm_python, tmp_path):
    # data.length=100 is too short for 5 keys: the job fails while generating data, after the engine started
    proc = scbench_vllm(vllm_python, ["model=smollm2-135m", "data.length=100", "data.turns=5", "progress=false",
                                      f"store={tmp_path / 's.sqlite'}", f"hydra.run.dir={tmp_path}/h"],
                        tmp_path / "log")
    log = finish(proc, tmp_path / "log", 900)
    assert proc.returncode != 0 and "too short" in log, log[-3000:]
    assert_no_survivor(proc)


@pytest.mark.slow
def test_no_vllm_process_survives_ctrl_c(vllm_python, tmp_path):
    db = tmp_path / "s.sqlite"
    proc = scbench_vllm(vllm_python, ["model=smollm2-135m", "data.length=4000", "data.n=4", "progress=false",
                                      f"store={db}", f"hydra.run.dir={tmp_path}/h"], tmp_path / "log")
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:  # the run row opens once the engine is up
        if db.exists():
            store = Store(db)
            opened = bool(store.runs())
            store.close()
            if opened:
                break
        time.sleep(1)
    assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
    os.kill(proc.pid, signal.SIGINT)
    log = finish(proc, tmp_path / "log", 120)
    assert proc.returncode != 0, log[-3000:]
    assert_no_survivor(proc)


@pytest.mark.slow
def test_ctrl_c_while_vllm_starts(vllm_python, tmp_path):
    # vLLM itself swallows a KeyboardInterrupt during its engine handshake; the engine makes Ctrl-C end the start
    proc = scbench_vllm(vllm_python, ["model=smollm2-135m", "progress=false", f"store={tmp_path / 's.sqlite'}",
                                      f"hydra.run.dir={tmp_path}/h"], tmp_path / "log")
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not any(
            p.startswith("VLLM::EngineCor") for p in session_alive(proc.pid)):
        time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
    time.sleep(5)  # well inside the start (imports, weights, handshake take longer here)
    os.kill(proc.pid, signal.SIGINT)
    log = finish(proc, tmp_path / "log", 120)
    assert proc.returncode != 0, log[-3000:]
    assert_no_survivor(proc)

