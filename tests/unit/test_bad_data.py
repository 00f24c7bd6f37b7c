"""Bad data fails early and precisely: empty files, non-UTF-8 bytes, malformed JSON, answers of the wrong type,
all before the model loads (as is a corrupt store)."""
from __future__ import annotations

import json

import pytest

from scbench.data import DataError, load_examples
from scbench.records import RunSpec
from scbench.registry import TASKS
from scbench.run import run_spec
from scbench.store import Store, StoreError

GOOD = {"id": 0, "context": "some context", "multi_turns": [{"input": "q", "answer": "a"}]}


def load(path, task="scbench_kv"):
    return load_examples(TASKS.get(task), "local", path=str(path))


@pytest.mark.parametrize("name,content", [("scbench_kv.jsonl", b""), ("scbench_kv.jsonl", b"\n  \n"),
                                          ("scbench_kv.json", b"[]")])
def test_empty_file_is_an_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"{name}: no rows"):
        load(tmp_path)


def test_non_utf8_names_file_row_and_byte_offset(tmp_path):
    first = (json.dumps(GOOD) + "\n").encode()
    bad = json.dumps({**GOOD, "id": 1, "context": "caf\u00e9 XX"}).encode().replace(b"XX", b"\xff\xfe")
    (tmp_path / "scbench_kv.jsonl").write_bytes(first + bad + b"\n")
    offset = len(first) + bad.index(b"\xff")
    with pytest.raises(DataError, match=rf"scbench_kv.jsonl:row 1: not UTF-8 text \(byte 0xff at byte offset {offset} "):
        load(tmp_path)
    (tmp_path / "scbench_kv.jsonl").unlink()
    (tmp_path / "scbench_kv.json").write_bytes(b"[\n" + bad + b"\n]")
    offset = 2 + bad.index(b"\xff")
    with pytest.raises(DataError, match=rf"scbench_kv.json:line 2: not UTF-8 text \(byte 0xff at byte offset {offset} "):
        load(tmp_path)


def test_malformed_json_reports_the_right_column(tmp_path):
    line = '{"id": 1, "context": "x", "multi_turns": [{"input": "q", "answer": "a"}],, }'
    col = line.index(",,") + 2  # 1-based column of the second comma
    (tmp_path / "scbench_kv.jsonl").write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"scbench_kv.jsonl:row 1: not valid JSON \(.* at column {col},"):
        load(tmp_path)


def test_byte_order_mark_is_not_a_json_error(tmp_path):
    (tmp_path / "scbench_kv.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert [e.id for e in load(tmp_path)] == ["0"]


@pytest.mark.parametrize("task,answer,ok", [
    ("scbench_kv", 42, False), ("scbench_kv", {"a": 1}, False), ("scbench_kv", ["x"], False), ("scbench_kv", "x", True),
    ("scbench_vt", ["AB", "CD"], True), ("scbench_vt", [1, 2], False), ("scbench_vt", [], False),
    ("scbench_mf", 17, True), ("scbench_mf", "17", True), ("scbench_mf", "seventeen", False), ("scbench_mf", True, False),
    ("scbench_qa_eng", ["a", "b"], True), ("scbench_qa_eng", 3.5, False),
    ("scbench_summary_with_needles", 12345, True), ("scbench_summary_with_needles", {"k": 1}, False),
])
def test_answer_types_are_checked_per_task(tmp_path, task, answer, ok):
    first = 1 if task == "scbench_mf" else "a"
    row = {**GOOD, "multi_turns": [{"input": "q", "answer": first}, {"input": "q2", "answer": answer}]}
    (tmp_path / f"{task}.jsonl").write_text(json.dumps(row) + "\n")
    if ok:
        assert load(tmp_path, task)[0].turns[1].answer == answer
    else:
        with pytest.raises(DataError, match=rf"{task}.jsonl:row 0: multi_turns\[1\].answer must be .* for {task}, got"):
            load(tmp_path, task)


@pytest.mark.parametrize("bad_id", [None, {"x": 1}, [1], True])
def test_ids_must_be_strings_or_integers(tmp_path, bad_id):
    (tmp_path / "scbench_kv.jsonl").write_text(json.dumps({**GOOD, "id": bad_id}) + "\n")
    with pytest.raises(DataError, match=r"row 0: field 'id' must be a string or an integer"):
        load(tmp_path)


def spec(**kw):
    base = dict(model={"name": "never-loaded", "path": "/nonexistent/model"}, method={"name": "full"}, task="scbench_kv",
                mode="multi_turn", data={"source": "local"}, max_turns=2, max_new_tokens=2)
    return RunSpec(**{**base, **kw})


def test_data_and_store_are_checked_before_the_model_loads(tmp_path, monkeypatch):
    """The model path does not exist: the data or store error must come first (and fast)."""
    import scbench.run as run

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the data and the store were checked")

    monkeypatch.setattr(run, "get_engine", no_model)
    (tmp_path / "scbench_kv.jsonl").write_text("")
    db = tmp_path / "s.sqlite"
    with pytest.raises(DataError, match="no rows"):
        run_spec(spec(data={"source": "local", "path": str(tmp_path)}), str(db), progress=False)
    store = Store(db, readonly=True)
    (r,) = store.runs()
    assert r["status"] == "failed" and "no rows" in r["error"] and store.turns() == []
    store.close()
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"not a database" * 200)
    (tmp_path / "scbench_kv.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(StoreError, match="corrupt.sqlite"):
        run_spec(spec(data={"source": "local", "path": str(tmp_path)}), str(corrupt), progress=False)


def test_corrupt_store_in_a_run_is_one_line(tmp_path, capsys):
    from scbench.cli import main

    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"not a database" * 200)
    with pytest.raises(SystemExit) as e:
        main(["run", f"store={corrupt}", "model=tiny-llama", "progress=false"])  # refused before any model loads
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("scbench run: error: ") and str(corrupt) in err[-1]
    assert not any("Traceback" in line for line in err)
