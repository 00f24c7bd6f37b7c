"""Spec validation before any model loads: one line + a fix, exit 2, no traceback, did-you-mean (no model loads here:
the engine loader is replaced by one that fails the test)."""
from __future__ import annotations

import pytest

from scbench.cli import main
from scbench.records import RunSpec
from scbench.validate import SpecError, check_spec, type_ok


@pytest.fixture
def no_model(monkeypatch):
    import scbench.run

    def refuse(*a, **k):
        raise AssertionError("a model was loaded during validation")

    monkeypatch.setattr(scbench.run, "get_engine", refuse)


def run_cli(args, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["run", *args, f"store={tmp_path}/s.sqlite"])
    err = capsys.readouterr().err
    return exit_.value.code, err


CASES = [  # overrides, what the error line says, what the fix line says
    (["data.source=local", "data.path=/no/such/dir"], "data.path /no/such/dir does not exist", "data.source=generated"),
    (["data.source=local"], "data.source=local needs data.path", "scbench data generate"),
    (["data.source=web"], "data.source='web' is not a data source", "generated, local, hub"),
    (["method=streamingllm", "method.n_local=-5"], "n_local must be an integer >= 1", "configs/method/streamingllm.yaml"),
    (["method=streamingllm", "method.n_local=abc"], "n_local must be an integer, got 'abc'", "method.n_local=3968"),
    (["method=streamingllm", "method.n_locall=128"], "has no knob 'n_locall'", "did you mean 'n_local'?"),
    (["method=snapkv,streamingllm", "method.n_local=128"], "'snapkv' has no knob 'n_local'", "its knobs: budget"),
    (["data.lenght=600"], "data has no key 'lenght'", "did you mean 'length'?"),
    (["stroe=x.sqlite"], "unknown key 'stroe'", "did you mean 'store'?"),
    (["data.length=9000"], "does not fit the window of smollm2-135m-probe (8192 tokens", "data.length<=7168"),
    (["max_new_tokens=5000"], "max_new_tokens=5000 leaves no room for the context", "max_new_tokens<=1024"),
    (["data.n=0"], "data.n=0 must be an integer >= 1 or null", "data.n=2"),
    (["max_turns=0"], "max_turns must be an integer >= 1", "configs/config.yaml"),
    (["task.variant=nope"], "task scbench_kv has no variant 'nope'", "task.variant=null"),
    (["model.adapter=/no/adapter"], "adapter folder '/no/adapter' not found", "model.adapter"),
    (["model.path=/no/model"], "model.path /no/model does not exist", "Hugging Face id"),
    (["model.path=random:tiny-lama"], "no such random preset", "did you mean 'tiny-llama'?"),
    (["engine=vllm", "method=streamingllm"], "runs on engines hf, not 'vllm'", "engine=hf"),
]


@pytest.mark.parametrize("args,line,fix", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_refused_before_the_model_loads(args, line, fix, capsys, tmp_path, no_model):
    code, err = run_cli(args, capsys, tmp_path)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and line in lines[0] and lines[1].startswith("  fix:") and fix in lines[1], err
    if "model.path=/no/model" not in args:  # (checked after the store opens: data and store errors come first)
        assert not (tmp_path / "s.sqlite").exists()  # a typo leaves no store ...
        assert list(tmp_path.iterdir()) == []  # ... and no Hydra folder


def test_local_path_without_the_task_rows(tmp_path, capsys, no_model):
    (tmp_path / "data").mkdir()
    code, err = run_cli(["data.source=local", f"data.path={tmp_path}/data"], capsys, tmp_path)
    assert code == 2 and "no data for scbench_kv" in err and "scbench data generate task=scbench_kv" in err


def test_sweep_lists_are_checked(capsys, tmp_path, no_model):
    code, err = run_cli(["-m", "task=scbench_kv,scbench_vtt"], capsys, tmp_path)
    assert code == 2 and "Did you mean 'scbench_vt'" in err


def test_unknown_command_and_data_typos(capsys):
    with pytest.raises(SystemExit) as e:
        main(["scroe"])
    assert e.value.code == 2 and "unknown command 'scroe'. Did you mean 'score'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data", "generate", "task=scbench_kv", "lenght=600"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "did you mean 'length'?" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def test_data_help_exits_0(capsys):
    main(["data", "--help"])
    assert "scbench data generate task=NAME" in capsys.readouterr().out
    main(["data", "generate", "--help"])


def test_check_spec_returns_the_method():
    spec = RunSpec(model={"name": "m", "path": "random:tiny-llama", "window": 4096},
                   method={"name": "snapkv", "budget": 0.25}, task="scbench_kv",
                   data={"source": "generated", "n": 1, "length": 300, "turns": 2, "seed": 0})
    assert check_spec(spec).budget == 0.25
    with pytest.raises(SpecError, match="budget must be a token count"):
        check_spec(RunSpec(**{**spec.__dict__, "method": {"name": "snapkv", "budget": 0}}))


@pytest.mark.parametrize("value,annotation,ok", [
    (3, "int", True), (True, "int", False), (3.0, "int", False), (3, "float", True), (0.5, "int | float", True),
    ("a", "int | float", False), (None, "int | None", True), (None, "int", False), ([1], "tuple[int, ...]", True),
    ("x", "Literal['x']", None), ("exact", "str", True), (False, "bool", True), (1, "bool", False),
])
def test_type_ok(value, annotation, ok):
    assert type_ok(value, annotation) is ok


def test_sweep_records_refused_jobs_and_lists_them(capsys, tmp_path, no_model):
    from scbench.store import Store

    with pytest.raises(SystemExit) as e:  # a sweep with failed jobs exits 1 ...
        main(["run", "-m", "mode=multi_turn,multi_request", "data.length=99999", f"store={tmp_path}/s.sqlite"])
    assert e.value.code == 1
    out = capsys.readouterr().out  # ... after its table
    table = out[out.index("model: smollm2-135m-probe"):].splitlines()
    assert table[1].split()[-1] == "status" and [line.split()[-1] for line in table[3:]] == ["failed", "failed"]
    runs = Store(tmp_path / "s.sqlite").runs()
    assert [r["status"] for r in runs] == ["failed", "failed"] and "does not fit the window" in runs[0]["error"]


def test_ls_runs_lists_every_kind_of_run(tmp_path, capsys):
    """A synthetic store (done runs of several methods, a failed run recorded before any spec existed)."""
    from support import make_store

    from scbench.run import record_failure

    make_store(tmp_path / "s.sqlite")
    record_failure(str(tmp_path / "s.sqlite"), "cfg-x", {"model": "m", "method": "oops", "task": None, "mode": None,
                                                        "config": {}}, "ValueError: bad")
    main(["ls", "runs", "--store", str(tmp_path / "s.sqlite")])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 18 and sum(" failed " in line for line in lines) == 2
    snap = next(line for line in lines if "snapkv(1/8)" in line)
    assert " done " in snap and " 2 " in snap
