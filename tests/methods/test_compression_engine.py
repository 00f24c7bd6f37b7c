"""Every compression method x its settings on a tiny random-weight Llama through HFEngine and the runner.

Checks resident KV bytes against the analytic size of each method's budget (within 1%), the cache lifecycle
(appends after compression, drop_last, checkpoint/rollback, compression on every turn) and full replays in
both shared-context modes with both compression policies.
"""
import dataclasses

import pytest
import torch

from scbench.engines.hf import HFEngine
from scbench.methods.pyramidkv import layer_budgets
from scbench.records import Example, RunSpec, Turn
from scbench.registry import METHODS, TASKS
from scbench.runner import Replay
from support import byte_tokenizer, random_llama

LAYERS, KV_HEADS, HEAD_DIM, ELT = 2, 2, 32, 4

# The test matrix: one line per method setting (adding a method = one line here).
CASES = [
    {"name": "full"},
    {"name": "streamingllm", "n_init": 8, "n_local": 56},
    {"name": "snapkv", "budget": 64},
    {"name": "snapkv", "budget": 0.125},
    {"name": "snapkv", "budget": 48, "window": 16, "kernel": 3},
    {"name": "pyramidkv", "budget": 64},
    {"name": "pyramidkv", "budget": 0.25, "beta": 4},
    {"name": "h2o", "budget": 64},
    {"name": "h2o", "budget": 0.125, "obs_window": 32, "recent_ratio": 0.25},
    {"name": "kivi", "bits": 2},
    {"name": "kivi", "bits": 4},
    {"name": "kivi", "bits": 2, "group": 16, "residual": 16},
]
IDS = ["-".join(str(v) for v in c.values()) for c in CASES]


def build_method(cfg: dict):
    """The method a config names (as scbench.run.build_method, without importing the data stack)."""
    return METHODS.get(cfg["name"])(**{k: v for k, v in cfg.items() if k != "name"})


@pytest.fixture(scope="module")
def engine():
    model = random_llama(300, layers=LAYERS, hidden=KV_HEADS * 2 * HEAD_DIM, heads=2 * KV_HEADS, kv_heads=KV_HEADS)
    return HFEngine(path="unused", model=model, tokenizer=byte_tokenizer(), dtype="float32")


def layer_tokens(cfg: dict, seen: int, cache_len: int) -> list[int]:
    """Tokens each layer keeps right after one compression of a cache of ``cache_len`` tokens (``seen`` fed)."""
    name = cfg["name"]
    if name in ("full", "kivi"):
        return [cache_len] * LAYERS
    if name == "streamingllm":
        return [min(cache_len, cfg["n_init"] + cfg["n_local"])] * LAYERS
    b = cfg["budget"]
    cap = b if isinstance(b, int) else max(1, int(b * seen))
    if name == "pyramidkv":
        return layer_budgets(cap, cache_len, cfg.get("window", 32), LAYERS, cfg.get("beta", 20))
    return [min(cap, cache_len)] * LAYERS


def analytic_bytes(cfg: dict, per_layer: list[int]) -> float:
    if cfg["name"] != "kivi":
        return sum(2 * KV_HEADS * n * HEAD_DIM * ELT for n in per_layer)
    bits, g, r = cfg["bits"], cfg.get("group", 32), cfg.get("residual", 32)
    total = 0.0
    for n in per_layer:
        nq = max(0, (n - r) // g) * g
        gv = min(g, HEAD_DIM)
        total += KV_HEADS * (2 * nq * HEAD_DIM * bits / 8 + 2 * (nq // g) * HEAD_DIM * ELT
                             + 2 * nq * (HEAD_DIM // gv) * ELT + 2 * (n - nq) * HEAD_DIM * ELT)
    return total


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("cfg", CASES, ids=IDS)
def test_resident_bytes_match_budget(engine, cfg):
    """kv_bytes (from the real tensors) equal the analytic size of the budget within 1%, after the prefill
    and after tokens appended by decoding; tensors are really smaller (no masking)."""
    s = engine.session(build_method(cfg))
    fs = s.feed(prompt(300), compress=True, sparse=False)
    kept = layer_tokens(cfg, 300, 300)
    mem = s.memory()
    assert mem["kv_full_bytes"] == 2 * LAYERS * KV_HEADS * HEAD_DIM * 300 * ELT
    assert mem["kv_bytes"] == pytest.approx(analytic_bytes(cfg, kept), rel=0.01)
    if cfg["name"] != "full":
        assert mem["kv_bytes"] < mem["kv_full_bytes"] and fs.compress_s > 0
    storage = sum(t.untyped_storage().nbytes() for layer in s.cache.layers for t in tensors_of(layer))
    assert storage == pytest.approx(mem["kv_bytes"], rel=0.01)  # no hidden full-size storage behind views
    gen = s.generate(24)
    appended = s.pos - 300
    assert appended == len(gen.tokens) - 1
    after = [n + appended for n in kept]
    assert s.memory()["kv_bytes"] == pytest.approx(analytic_bytes(cfg, after), rel=0.01)


def tensors_of(layer):
    if hasattr(layer, "kchunks"):
        return [t for c in (*layer.kchunks, *layer.vchunks) for t in c] + [layer.keys, layer.values]
    return [layer.keys, layer.values]


def cache_state(session):
    return [tuple(t.clone() for t in (layer.dequantized() if hasattr(layer, "dequantized") else (layer.keys, layer.values)))
            for layer in session.cache.layers]


@pytest.mark.parametrize("cfg", CASES, ids=IDS)
def test_lifecycle_after_compression(engine, cfg):
    """Appends after compression, drop_last, rollback to a checkpoint, and compression firing again."""
    s = engine.session(build_method(cfg))
    s.feed(prompt(200), compress=True, sparse=False)
    before, nbytes, pos = cache_state(s), s.memory()["kv_bytes"], s.pos
    token = s.checkpoint(rewrites=False)
    s.feed(prompt(70, seed=1), compress=False, sparse=False)  # a request on top of the compressed context
    s.generate(20)
    s.rollback(token)
    assert s.pos == pos and s.memory()["kv_bytes"] == nbytes
    for (k0, v0), (k1, v1) in zip(before, cache_state(s)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    s.feed(prompt(50, seed=2), compress=False, sparse=False)
    s.generate(10)
    s.drop_last(s.pos - pos)
    assert s.memory()["kv_tokens"] == max(layer_tokens(cfg, 200, 200))
    token, nbytes = s.checkpoint(rewrites=True), s.memory()["kv_bytes"]
    s.feed(prompt(120, seed=3), compress=True, sparse=False)  # every_turn: fires again on a grown cache
    lengths = [layer.get_seq_length() for layer in s.cache.layers]
    if cfg["name"] in ("snapkv", "h2o", "streamingllm"):
        assert max(lengths) <= max(layer_tokens(cfg, s.pos, max(lengths) + 1000))
    s.generate(5)
    s.rollback(token)
    assert s.memory()["kv_bytes"] == nbytes


def test_no_eviction_within_budget_matches_full(engine):
    """A method whose budget covers the prompt (or KIVI before its first group) leaves decoding unchanged."""
    ids = prompt(60)
    outs = {}
    for cfg in ({"name": "full"}, {"name": "snapkv", "budget": 100}, {"name": "pyramidkv", "budget": 100},
                {"name": "h2o", "budget": 100}, {"name": "kivi", "bits": 2}):
        s = engine.session(build_method(cfg))
        s.feed(ids, compress=True, sparse=False)
        outs[cfg["name"]] = s.generate(3).tokens  # KIVI quantizes nothing below residual + group tokens
    assert all(v == outs["full"] for v in outs.values())


def make_example() -> Example:
    words = " ".join(f"key{i}=val{i * 7 % 97}" for i in range(24))
    turns = tuple(Turn(input=f'Key: "key{i}"\nThe value is: ', answer=f"val{i * 7 % 97}") for i in (3, 17))
    return Example(id="tiny", context=words, turns=turns)


RUNNER_CASES = [CASES[i] for i in (1, 3, 6, 8, 9)]  # one setting per method keeps the suite fast


@pytest.mark.parametrize("cfg", RUNNER_CASES, ids=[IDS[i] for i in (1, 3, 6, 8, 9)])
def test_runner_both_modes_both_policies(engine, cfg):
    task = TASKS.get("scbench_kv")
    for mode in ("multi_turn", "multi_request"):
        for compress in ("once", "every_turn"):
            spec = RunSpec(model={}, method=cfg, task="scbench_kv", mode=mode, max_turns=2, max_new_tokens=6,
                           compress=compress, query_visible=mode == "multi_turn" and compress == "once")
            results = list(Replay(engine, build_method(cfg), task, make_example(), spec))
            assert [r.turn for r in results] == [0, 1]
            for r in results:
                st = dataclasses.asdict(r.stats)
                assert 0 < st["kv_bytes"] < st["kv_full_bytes"]
