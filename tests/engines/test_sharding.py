"""Models larger than one device (model.device_map): planning on the meta device, random weights built on their
mapped devices, the engine over a dispatched model, per-device accounting, and (with two GPUs) a split model
against the unsplit one."""
from __future__ import annotations

import pytest
import torch
from support import byte_tokenizer, random_llama
from transformers import AutoConfig

from scbench.engines import fastdecode, sharding
from scbench.engines.hf import HFEngine
from scbench.kv import cache as kvc
from scbench.records import Example, RunSpec, Turn
from scbench.registry import METHODS, TASKS
from scbench.runner import Replay

LLAMA_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                 intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
H200 = 141 * 10**9


def test_plan_splits_a_70b_model_by_whole_layers_over_two_gpus():
    config = AutoConfig.for_model("llama", **LLAMA_70B)
    mapping = sharding.plan(config, {0: int(H200 * 0.75), 1: int(H200 * 0.75)})
    layers = [mapping[f"model.layers.{i}"] for i in range(80)]
    assert set(mapping.values()) == {0, 1}
    assert layers == sorted(layers)  # layers 0..k on GPU 0, the rest on GPU 1: one hop per forward
    assert abs(layers.count(0) - layers.count(1)) <= 6  # balanced
    assert mapping["model.embed_tokens"] == 0 and mapping["lm_head"] == 1


def test_plan_refuses_devices_too_small_for_the_weights():
    config = AutoConfig.for_model("llama", **LLAMA_70B)
    with pytest.raises(ValueError, match=r"131\.\d GiB in bfloat16\) do not fit the devices 0, 1"):
        sharding.plan(config, {0: 60 * 10**9, 1: 60 * 10**9})


@pytest.mark.parametrize("bad", ["everywhere", 3, {}, {"model.layers.0": "gpu7"}])
def test_bad_device_maps_are_refused(bad):
    with pytest.raises(ValueError, match="device_map"):
        sharding.check_device_map(bad)


def test_random_weights_built_on_their_mapped_devices():
    config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    mapping = {m: "cpu" for m in ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm",
                                  "model.rotary_emb", "lm_head")}
    model = sharding.random_sharded(config, mapping, seed=0, dtype=torch.float32)
    plain = random_llama(300, seed=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert torch.equal(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - config.initializer_range) < 0.2 * config.initializer_range
    with pytest.raises(ValueError, match="meta device"):
        sharding.random_sharded(config, {"model.layers.0": "cpu"}, seed=0, dtype=torch.float32)


def example() -> Example:
    words = " ".join(f"key{i}=val{i * 7 % 97}" for i in range(24))
    turns = tuple(Turn(input=f'Key: "key{i}"\nThe value is: ', answer=f"val{i * 7 % 97}") for i in (3, 17))
    return Example(id="tiny", context=words, turns=turns)


def replay(engine, method_cfg, mode):
    spec = RunSpec(model={}, method=method_cfg, task="scbench_kv", mode=mode, max_turns=2, max_new_tokens=8)
    method = METHODS.get(method_cfg["name"])(**{k: v for k, v in method_cfg.items() if k != "name"})
    return list(Replay(engine, method, TASKS.get("scbench_kv"), example(), spec))


@pytest.mark.parametrize("method_cfg", [{"name": "full"}, {"name": "snapkv", "budget": 64},
                                        {"name": "kivi", "bits": 2}, {"name": "quest", "budget": 64, "page_size": 16}])
def test_engine_over_a_dispatched_model_matches_the_plain_engine(method_cfg):
    """The device-map path (accelerate's hooks, input device from the embedding) gives the plain engine's rows."""
    tok = byte_tokenizer()
    plain = HFEngine("tiny", model=random_llama(len(tok), seed=1, eos_token_id=tok.eos_token_id), tokenizer=tok,
                     device="cpu", dtype="float32")
    mapping = {m: "cpu" for m in ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm",
                                  "model.rotary_emb", "lm_head")}
    mapped = HFEngine("tiny", model=random_llama(len(tok), seed=1, eos_token_id=tok.eos_token_id), tokenizer=tok,
                      device="cpu", dtype="float32", device_map=mapping)
    assert mapped.devices == [torch.device("cpu")] and hasattr(mapped.model, "hf_device_map")
    for mode in ("multi_turn", "multi_request"):
        a, b = replay(plain, method_cfg, mode), replay(mapped, method_cfg, mode)
        assert [r.prediction for r in a] == [r.prediction for r in b]
        assert [r.stats.kv_bytes for r in a] == [r.stats.kv_bytes for r in b]


def test_sharded_settings_refused_before_loading():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="offload is not supported with model.device_map"):
        HFEngine("tiny", model=random_llama(len(tok)), tokenizer=tok, device="cpu", device_map="auto", offload="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs GPUs"):
            HFEngine("tiny", model=random_llama(len(tok)), tokenizer=tok, device="cpu", device_map="auto")


class _Layer:
    """A plain key/value cache layer on a given device (meta tensors: shapes and bytes without memory)."""

    is_initialized = True

    def __init__(self, device, tokens=10):
        self.keys = torch.empty(1, 2, tokens, 32, device=device, dtype=torch.bfloat16)
        self.values = torch.empty(1, 2, tokens, 32, device=device, dtype=torch.bfloat16)


def test_bytes_are_counted_per_device_and_fast_decode_refuses_a_split_cache():
    from transformers.cache_utils import DynamicLayer

    class Cache:
        layers = [_Layer("cpu"), _Layer("cpu"), _Layer("meta", 20)]

    per_device = kvc.kv_nbytes_by_device(Cache)
    assert per_device == {"cpu": 2 * 2 * 10 * 2 * 32 * 2, "meta": 2 * 20 * 2 * 32 * 2}
    assert sum(per_device.values()) == kvc.kv_nbytes(Cache)

    class Split:
        layers = []

    for dev in ("cpu", "meta"):
        layer = DynamicLayer()
        layer.lazy_initialization(torch.empty(1, 2, 4, 8, device=dev), torch.empty(1, 2, 4, 8, device=dev))
        layer.keys, layer.values = torch.empty(1, 2, 4, 8, device=dev), torch.empty(1, 2, 4, 8, device=dev)
        Split.layers.append(layer)
    method = METHODS.get("full")()
    assert "2 devices" in fastdecode.unsupported(Split, method)
    Split.layers = Split.layers[:1]
    assert fastdecode.unsupported(Split, method) is None


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_split_matches_the_unsplit_model():
    tok = byte_tokenizer()
    one = HFEngine("tiny", model=random_llama(len(tok), seed=2, eos_token_id=tok.eos_token_id), tokenizer=tok,
                   device="cuda:0", dtype="float32")
    mapping = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1,
               "model.rotary_emb": 1, "lm_head": 1}
    two = HFEngine("tiny", model=random_llama(len(tok), seed=2, eos_token_id=tok.eos_token_id), tokenizer=tok,
                   device="cuda:0", dtype="float32", device_map=mapping)
    assert [str(d) for d in two.devices] == ["cuda:0", "cuda:1"]
    for method_cfg in ({"name": "full"}, {"name": "snapkv", "budget": 64}):
        for mode in ("multi_turn", "multi_request"):
            a, b = replay(one, method_cfg, mode), replay(two, method_cfg, mode)
            assert [r.prediction for r in a] == [r.prediction for r in b]
            assert [r.stats.kv_bytes for r in a] == [r.stats.kv_bytes for r in b]
            assert set(b[-1].stats.device_bytes) == {"cuda:0", "cuda:1"}
            assert sum(d["kv_bytes"] for d in b[-1].stats.device_bytes.values()) == b[-1].stats.kv_bytes


def test_a_method_that_cannot_run_sharded_is_refused_before_loading(tmp_path):
    from scbench.run import run_spec

    spec = RunSpec(model={"name": "x", "path": "/nonexistent/model", "device_map": "auto"},
                   method={"name": "cacheblend"}, task="scbench_kv", mode="multi_turn", max_turns=1)
    with pytest.raises(ValueError, match="cacheblend.*split over devices.*one device"):
        run_spec(spec, str(tmp_path / "s.sqlite"), progress=False)


def test_random_preset_built_over_a_device_map(monkeypatch):
    """model.path=random:<preset> with model.device_map: weights built on the mapped devices (here all on the CPU)."""
    from scbench.engines import models

    monkeypatch.setitem(models.RANDOM_PRESETS, "tiny-test", {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 4096})
    tok = byte_tokenizer()
    monkeypatch.setattr(models, "random_parts", lambda path, tokenizer=None: ("tiny-test", 3, tok))
    mapping = {m: "cpu" for m in ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm",
                                  "model.rotary_emb", "lm_head")}
    engine = HFEngine("random:tiny-test@3", device="cpu", dtype="float32", device_map=mapping)
    assert hasattr(engine.model, "hf_device_map") and engine.devices == [torch.device("cpu")]
    rows = replay(engine, {"name": "full"}, "multi_turn")
    assert len(rows) == 2 and rows[0].stats.kv_bytes > 0
