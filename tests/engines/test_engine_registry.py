"""Engines sit in a registry like methods and tasks; hf and vLLM share one tokenizer path; vLLM's processes are
handled apart from it. Everything here runs without vLLM installed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from scbench.engines.base import Engine
from scbench.engines.chat import TokenizerEngine, split_model_config, stop_ids
from scbench.registry import ENGINES, EngineRegistry, UnknownName
from support import byte_tokenizer, random_llama


def test_engines_are_registered_lazily_with_did_you_mean():
    assert ENGINES.names() == ["hf", "vllm"]
    with pytest.raises(UnknownName, match="Did you mean 'vllm'.*Valid engines: hf, vllm"):
        ENGINES.get("vlm")
    with pytest.raises(ValueError, match="engines: hf, vllm"):  # a bad config value, too
        ENGINES.open({"path": "x"}, "sglang")


def test_from_config_refuses_bad_keys_before_loading():
    from scbench.engines.hf import HFEngine
    from scbench.engines.vllm import VLLMEngine

    with pytest.raises(ValueError, match="engine hf takes no engine options, got kv_cache_dtype"):
        HFEngine.from_config({"path": "embedded:smollm2"}, {"kv_cache_dtype": "fp8"})
    with pytest.raises(ValueError, match="unknown model config key.*engine hf: colour"):
        HFEngine.from_config({"path": "embedded:smollm2", "colour": "red"})
    with pytest.raises(ValueError, match="unknown model config key.*engine vllm: decode, prefill_chunk"):
        VLLMEngine.from_config({"path": "embedded:smollm2", "prefill_chunk": 64, "decode": "fast"})
    with pytest.raises(ValueError, match="engine vllm: the model config needs a 'path'.*got keys name"):
        VLLMEngine.from_config({"name": "m"})
    path, common, rest = split_model_config({"path": "p", "dtype": "float32", "offload": "cpu"}, "hf")
    assert (path, rest) == ("p", {"offload": "cpu"})
    assert common == {"name": None, "device": None, "dtype": "float32", "window": None, "trust_remote_code": False,
                      "adapter": None}


class _Fake(Engine):
    """An engine that only records how it was built and closed."""

    name = "fake"
    built: list = []

    def __init__(self, model, options):
        self.model, self.options, self.closed = model, options, False
        _Fake.built.append(self)

    @classmethod
    def from_config(cls, model, options=None):
        return cls(model, options)

    def close(self):
        self.closed = True

    render_chat = encode = decode = session = describe = lambda self, *a, **k: None
    window = 1


class _Exclusive(_Fake):
    name = "exclusive"
    exclusive = True


def test_open_keeps_one_engine_per_config_and_closes_exclusive_ones():
    reg = EngineRegistry()
    reg.add("fake", _Fake)
    reg.add("exclusive", _Exclusive)
    _Fake.built = []
    a = reg.open({"path": "m", "dtype": "auto"}, "fake")
    assert reg.open({"dtype": "auto", "path": "m"}, "fake") is a  # key order does not matter
    b = reg.open({"path": "m", "dtype": "auto"}, "fake", {"x": 1})
    assert b is not a and len(_Fake.built) == 2
    e1 = reg.open({"path": "m"}, "exclusive", {"k": 1})
    e2 = reg.open({"path": "m"}, "exclusive", {"k": 2})  # another exclusive one closes the first
    assert e1.closed and not e2.closed and not a.closed and not b.closed
    assert reg.open({"path": "m"}, "exclusive", {"k": 2}) is e2
    assert reg.open({"path": "m"}, "exclusive", {"k": 1}) is not e1 and e2.closed


def test_hf_and_vllm_share_one_tokenizer_path():
    from scbench.engines.hf import HFEngine
    from scbench.engines.vllm import VLLMEngine

    for name in ("render_chat", "encode", "decode", "chat_template_sha256"):
        assert getattr(HFEngine, name) is getattr(TokenizerEngine, name) is getattr(VLLMEngine, name), name
        assert name not in vars(HFEngine) and name not in vars(VLLMEngine), name


class _Text(TokenizerEngine):
    """Only the shared tokenizer path."""

    window = 1
    session = describe = lambda self, *a: None

    def __init__(self, tokenizer):
        self.tokenizer, self.model_name = tokenizer, "byte"


def test_tokenizer_engine_renders_encodes_and_stops(tiny_engine):
    tok = byte_tokenizer()
    eng = _Text(tok)
    text = eng.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert eng.decode(eng.encode("héllo", add_special_tokens=False)) == "héllo"
    assert len(eng.chat_template_sha256()) == 16
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_ids(tok, None, "byte") == {end}
    assert stop_ids(tok, [7, 9], "byte") == {end, 7, 9}
    tok.chat_template = None
    with pytest.raises(ValueError, match="'byte' has no chat template"):
        eng.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    # the hf engine's stop set is the same function's, with its generation config's EOS
    gen = tiny_engine.model.generation_config.eos_token_id
    assert tiny_engine.stop_ids == stop_ids(tiny_engine.tokenizer, gen, tiny_engine.model_name)


def test_child_processes_are_found_and_reaped():
    pytest.importorskip("psutil")
    from scbench.engines.vllm_process import ChildProcesses, exit_on_sigterm, peak_rss

    closed = []
    before = signal.getsignal(signal.SIGTERM)
    procs = ChildProcesses(lambda: closed.append(1))
    if before in (signal.SIG_DFL, None):
        assert signal.getsignal(signal.SIGTERM) is exit_on_sigterm
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        procs.started()
        assert [p.pid for p in procs.spawned] == [child.pid]
        assert procs.peak_memory() >= peak_rss(child.pid) > 0
        procs.reap()  # psutil waits for the child: its exit status lands on the psutil handle
        assert [p.returncode for p in procs.spawned] == [-signal.SIGTERM] and not procs.new()
    finally:
        if child.poll() is None:
            child.kill()
    procs.release()
    assert signal.getsignal(signal.SIGTERM) is before and closed == []


def test_merged_folder_saves_atomically_once(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from scbench.engines import models
    from scbench.engines.vllm import merged_folder

    monkeypatch.setenv("SCBENCH_CACHE", str(tmp_path / "cache"))
    tok = byte_tokenizer()
    base = random_llama(len(tok), layers=1, hidden=32, intermediate=64, heads=2, kv_heads=1, window=64)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / models.ADAPTER_CONFIG).write_text(json.dumps({"format": models.ADAPTER_FORMAT, "rank": 2, "alpha": 4}))
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    save_file({"model.layers.0.self_attn.q_proj.lora_A": a, "model.layers.0.self_attn.q_proj.lora_B": b},
              str(adapter / models.ADAPTER_WEIGHTS))
    out = merged_folder(str(tmp_path / "base"), str(adapter))
    merged = AutoModelForCausalLM.from_pretrained(out)
    want = base.model.layers[0].self_attn.q_proj.weight + 2 * b @ a
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, want)
    assert (tmp_path / "cache" / "models").exists() and merged_folder(str(tmp_path / "base"), str(adapter)) == out
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [out.rsplit("/", 1)[-1]]  # no tmp left


def test_long_texts_encoded_once(tiny_engine, monkeypatch):
    """A shared context's prompt (``chat.LONG_TEXT`` characters or more) is tokenized once per engine: later calls
    return equal copies (a caller may cut its list), short texts and the other special-token setting are encoded
    afresh, and the memo keeps the ``LONG_KEPT`` most recent."""
    from scbench.engines import chat

    calls = []
    tok = tiny_engine.tokenizer
    real = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, text, **kw: calls.append(len(text)) or real(self, text, **kw))
    monkeypatch.setattr(tiny_engine, "_encoded", chat.OrderedDict(), raising=False)
    text = " ".join(f"key{i} value{i}" for i in range(chat.LONG_TEXT // 8))
    first = tiny_engine.encode(text, add_special_tokens=False)
    first.clear()  # the caller's copy
    again = tiny_engine.encode(text, add_special_tokens=False)
    assert again == real(tok, text, add_special_tokens=False)["input_ids"] and len(calls) == 1
    tiny_engine.encode(text, add_special_tokens=True)
    tiny_engine.encode("short", add_special_tokens=False)
    tiny_engine.encode("short", add_special_tokens=False)
    assert len(calls) == 4
    for i in range(chat.LONG_KEPT):
        tiny_engine.encode(text + str(i), add_special_tokens=False)
    assert len(tiny_engine._encoded) == chat.LONG_KEPT and (id(tok), False, text) not in tiny_engine._encoded
