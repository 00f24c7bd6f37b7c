"""Bad input is refused with messages that name the file, row, field or valid choices."""
from __future__ import annotations

import json
import logging

import pytest

from scbench.data import DataError, load_examples, parse_row
from scbench.registry import METHODS, TASKS, UnknownName


def test_unknown_names_suggest():
    with pytest.raises(UnknownName, match="Did you mean 'scbench_kv'.*Valid tasks"):
        TASKS.get("scbench_kvv")
    with pytest.raises(UnknownName, match="Did you mean 'streamingllm'"):
        METHODS.get("streamingllm2")


def test_cli_refuses_unknown_group_choice(capsys):
    from scbench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "model=smollm3", "task=scbench_kv"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'smollm3'" in err and "smollm2-135m" in err


@pytest.mark.parametrize("row,needle", [
    ({"context": "x", "multi_turns": [{"input": "q", "answer": "a"}]}, "missing field 'id'"),
    ({"id": 1, "context": 3, "multi_turns": [{"input": "q", "answer": "a"}]}, "field 'context' must be a string"),
    ({"id": 1, "context": "x", "multi_turns": []}, "'multi_turns' must be a non-empty list"),
    ({"id": 1, "context": "x", "multi_turns": [{"input": 5, "answer": "a"}]}, r"multi_turns\[0\].input must be a string"),
    ({"id": 1, "context": "x", "multi_turns": [{"input": "q"}]}, r"multi_turns\[0\].answer is missing"),
])
def test_malformed_rows(row, needle):
    with pytest.raises(DataError, match=needle):
        parse_row(row, "f.jsonl:row 7")


def test_local_file_errors_name_file_and_row(tmp_path):
    good = {"id": 0, "context": "c", "multi_turns": [{"input": "q", "answer": "a"}]}
    (tmp_path / "scbench_kv.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"id": 1, "context": "c"}) + "\n")
    with pytest.raises(DataError, match=r"scbench_kv.jsonl:row 1: missing field 'multi_turns'"):
        load_examples(TASKS.get("scbench_kv"), "local", path=str(tmp_path))
    (tmp_path / "scbench_kv.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match=r"scbench_kv.jsonl:row 1: not valid JSON"):
        load_examples(TASKS.get("scbench_kv"), "local", path=str(tmp_path))
    with pytest.raises(DataError, match="no data for scbench_vt"):
        load_examples(TASKS.get("scbench_vt"), "local", path=str(tmp_path))


def test_local_parquet_and_dir(tmp_path):
    import pandas as pd

    rows = [{"id": i, "context": f"ctx {i}", "multi_turns": [{"input": "q", "answer": "a"}]} for i in range(3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "scbench_kv.parquet")
    exs = load_examples(TASKS.get("scbench_kv"), "local", path=str(tmp_path), n=2)
    assert [e.id for e in exs] == ["0", "1"] and exs[0].turns[0].answer == "a"
    assert "scbench_kv.parquet:row 0" in exs[0].source


def test_hub_offline_message(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline mode is set.*data.source=local"):
        load_examples(TASKS.get("scbench_kv"), "hub")


@pytest.mark.parametrize("kw,needle", [({"n": 0}, "data.n must be >= 1"), ({"length": 10}, "data.length must be >= 64"),
                                       ({"turns": 0}, "data.turns must be >= 1")])
def test_generator_validation(kw, needle):
    args = {"n": 1, "length": 200, "turns": 2} | kw
    with pytest.raises(DataError, match=needle):
        load_examples(TASKS.get("scbench_kv"), "generated", **args)


@pytest.mark.parametrize("knobs,needle", [({"n_local": 0}, "n_local must be an integer >= 1"),
                                          ({"n_init": "a"}, "n_init must be an integer"),
                                          ({"budget": 3}, "has no knob")])
def test_method_knobs(knobs, needle):
    from scbench.run import build_method

    with pytest.raises(ValueError, match=needle):
        build_method({"name": "streamingllm", **knobs})


@pytest.mark.parametrize("field,value", [("mode", "multi"), ("compress", "always"), ("max_turns", 0), ("bos", "x")])
def test_spec_validation(field, value):
    from scbench.records import RunSpec

    with pytest.raises(ValueError, match=field):
        RunSpec(model={}, method={"name": "full"}, task="scbench_kv", **{field: value}).validate()


def test_truncation_warns_with_counts(tiny_engine, caplog):
    from scbench.prompts import PromptBuilder

    task = TASKS.get("scbench_kv")
    ex = load_examples(task, "generated", n=1, length=1500, turns=1, count=lambda t: len(tiny_engine.encode(t, False)))[0]
    with caplog.at_level(logging.WARNING):
        b = PromptBuilder(tiny_engine, task, ex, mode="multi_turn", n_turns=1, max_seq_length=1150)
        tp = b.first()
    assert b.budget == 1000 and len(tp.ids) == 1000  # 1150 - 150 new tokens
    assert b.truncated > 0
    assert any("middle-truncated to 1000" in r.message and f"removed {b.truncated}" in r.message for r in caplog.records)
    # keeps the head (template start) and the tail (the question)
    full = tiny_engine.encode(tiny_engine.render_chat([{"role": "user", "content": task.first_prompt(ex).text}], True), True)
    assert tp.ids[:500] == full[:500] and tp.ids[-500:] == full[-500:]


def test_no_room_for_prompt(tiny_engine):
    from scbench.prompts import PromptBuilder

    task = TASKS.get("scbench_kv")
    ex = load_examples(task, "generated", n=1, length=400, turns=5)[0]
    with pytest.raises(ValueError, match="no room for the prompt"):
        PromptBuilder(tiny_engine, task, ex, mode="multi_request", n_turns=5, max_seq_length=1700)


def test_sliding_window_model_refused(smol_tokenizer):
    """Our attention function is full causal attention: a sliding-window model would silently compute something
    else beyond its window, so the engine refuses it up front, naming the layers."""
    from transformers import MistralConfig, MistralForCausalLM

    from scbench.engines.hf import HFEngine

    cfg = MistralConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=16)
    with pytest.raises(ValueError, match=r"sliding-window attention \(window 16, layers \[0, 1\]"):
        HFEngine("tiny-mistral", model=MistralForCausalLM(cfg), tokenizer=smol_tokenizer, device="cpu")
    cfg.sliding_window = None  # Mistral v0.2+: full attention, accepted
    HFEngine("tiny-mistral", model=MistralForCausalLM(cfg), tokenizer=smol_tokenizer, device="cpu")
