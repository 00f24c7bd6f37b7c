"""Ragged KV layers and the methods that store per-head lengths (AdaKV, KVzip, DuoAttention), plus compression
during decoding (policy.compress=decode_every), on the tiny random Llama (2 layers, 4 query / 2 KV heads)."""
import dataclasses
import json

import pytest
import torch

from scbench.engines.attention import causal_attention
from scbench.kv.ragged import RaggedLayer, ragged_attention, reference_ragged_attention
from scbench.methods.head_budgets import allocate, reference_allocate
from scbench.methods.reconstruction import chunk_scores, reference_chunk_scores
from scbench.records import Example, RunSpec, Turn
from scbench.registry import METHODS, TASKS
from scbench.runner import Replay
from support import byte_tokenizer, make_tiny_engine

LAYERS, KV_HEADS, HEAD_DIM, ELT = 2, 2, 16, 4


@pytest.fixture(scope="module")
def engine():
    return make_tiny_engine(byte_tokenizer())


@pytest.fixture(scope="module")
def gates_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("duo") / "gates.json"
    path.write_text(json.dumps({"gates": [[0.9, 0.1], [0.2, 0.8]], "n_init": 4, "n_local": 28}))
    return str(path)


def method(cfg):
    return METHODS.get(cfg["name"])(**{k: v for k, v in cfg.items() if k != "name"})


def prompt(n, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def random_ragged(lengths, suffix, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = RaggedLayer([torch.randn(n, HEAD_DIM, generator=g) for n in lengths],
                        [torch.randn(n, HEAD_DIM, generator=g) for n in lengths])
    if suffix:
        layer.update(torch.randn(1, len(lengths), suffix, HEAD_DIM, generator=g),
                     torch.randn(1, len(lengths), suffix, HEAD_DIM, generator=g))
    return layer


@pytest.mark.parametrize("lengths,suffix,tq", [([5, 40], 0, 1), ([17, 3, 30], 6, 1), ([12, 25], 9, 4), ([8, 8], 3, 3)])
def test_ragged_attention_matches_reference(lengths, suffix, tq):
    layer = random_ragged(lengths, suffix)
    q = torch.randn(1, 2 * len(lengths), tq, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ragged_attention(q, layer), reference_ragged_attention(q, layer), atol=1e-5)


@pytest.mark.parametrize("lengths,suffix,tq", [([17, 3, 30], 6, 1), ([12, 70], 9, 4), ([8, 8], 20, 12)])
def test_ragged_feed_kernel_matches_reference(lengths, suffix, tq):
    """A query feed as one batched-decode kernel call (kv.ragged.ragged_feed: CUDA, or Triton's interpreter here)."""
    import os

    from scbench.kernels import ragged_shared
    from scbench.kv.ragged import ragged_feed

    if ragged_shared.triton is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs Triton (CUDA, or TRITON_INTERPRET=1 on CPU)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layer = random_ragged(lengths, suffix)
    q = torch.randn(1, 2 * len(lengths), tq, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    want = reference_ragged_attention(q, layer)
    if dev == "cuda":
        layer.prefix_k, layer.prefix_v = layer.prefix_k.cuda(), layer.prefix_v.cuda()
        layer.keys, layer.values = layer.keys.cuda(), layer.values.cuda()
        q = q.cuda()
    for _ in range(2):  # the second call reuses the layer's work list
        torch.testing.assert_close(ragged_feed(q, layer).cpu(), want, atol=2e-5, rtol=2e-5)
    if len(set(lengths)) == 1:  # equal lengths: the same as dense attention
        k = torch.stack([layer.head(h)[0] for h in range(len(lengths))])[None]
        v = torch.stack([layer.head(h)[1] for h in range(len(lengths))])[None]
        assert torch.allclose(ragged_attention(q, layer), causal_attention(q, k, v), atol=1e-5)


def test_ragged_layer_bytes_crop_snapshot():
    layer = random_ragged([10, 30], 4)
    assert layer.scbench_nbytes() == 2 * (10 + 30 + 2 * 4) * HEAD_DIM * ELT  # exactly the kept tokens
    assert layer.get_seq_length() == 34 and layer.head_lengths() == [14, 34]
    snap = layer.scbench_snapshot()
    k0 = layer.head(0)[0].clone()
    layer.scbench_crop(32)  # into the suffix
    assert layer.head_lengths() == [12, 32]
    layer.scbench_crop(28)  # past the suffix: every head loses its last tokens
    assert layer.head_lengths() == [8, 28] and torch.equal(layer.head(0)[0], k0[:8])
    layer.scbench_restore(snap)
    assert torch.equal(layer.head(0)[0], k0)
    with pytest.raises(ValueError, match="cannot crop"):
        layer.scbench_crop(3)
    with pytest.raises(ValueError, match="one key and one value"):
        RaggedLayer([], [])


@pytest.mark.parametrize("seed", range(4))
def test_allocate_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=g) for n in (7, 0, 30, 12)]
    for total, floor in ((10, 0), (20, 3), (49, 2), (100, 5)):
        got, ref = allocate(scores, total, floor), reference_allocate(scores, total, floor)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        assert sum(len(i) for i in got) == min(total, 49)
        assert all(len(i) >= min(floor, len(s)) for i, s in zip(got, scores))


def test_reconstruction_scores_match_reference():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 9, HEAD_DIM, generator=g), torch.randn(60 + 9, HEAD_DIM, generator=g)
    for sink, start, end in ((4, 10, 40), (0, 0, 60), (8, 3, 20)):
        assert torch.allclose(chunk_scores(q, k, sink, start, end), reference_chunk_scores(q, k, sink, start, end),
                              atol=1e-6)


CASES = [
    {"name": "adakv", "budget": 64},
    {"name": "adakv", "budget": 0.25, "alpha": 0.0, "window": 16},
    {"name": "kvzip", "budget": 64, "chunk": 100},
    {"name": "kvzip", "budget": 64, "level": "layer", "chunk": 128},
    {"name": "kvzip", "budget": 0.25, "level": "uniform"},
    {"name": "duo_attention", "n_init": 4, "n_local": 28},
]
IDS = ["-".join(str(v) for v in c.values()) for c in CASES]


def expected_tokens(cfg, n):
    """Tokens kept over all layers and heads right after one compression of an n-token prompt."""
    if cfg["name"] == "duo_attention":
        return 2 * n + 2 * min(n, cfg["n_init"] + cfg["n_local"])  # gates file: one retrieval head per layer
    b = cfg["budget"]
    cap = b if isinstance(b, int) else int(b * n)
    return LAYERS * KV_HEADS * min(cap, n)


@pytest.mark.parametrize("cfg", CASES, ids=IDS)
def test_resident_bytes_fall_by_the_budget(engine, cfg, gates_file):
    """Ragged storage holds exactly the kept tokens (no padding): bytes = kept tokens x head_dim x 2 x 4."""
    if cfg["name"] == "duo_attention":
        cfg = {**cfg, "heads": gates_file}
    s = engine.session(method(cfg))
    fs = s.feed(prompt(300), compress=True, sparse=True)
    assert fs.compress_s > 0 and s.pos == 300
    assert s.memory()["kv_bytes"] == 2 * expected_tokens(cfg, 300) * HEAD_DIM * ELT
    ragged = [layer for layer in s.cache.layers if isinstance(layer, RaggedLayer)]
    assert bool(ragged) == (cfg.get("level") != "uniform")
    gen = s.generate(12)
    assert gen.decode_path == "plain" and s.pos == 300 + len(gen.tokens) - 1
    grown = expected_tokens(cfg, 300) + LAYERS * KV_HEADS * (len(gen.tokens) - 1)
    assert s.memory()["kv_bytes"] == 2 * grown * HEAD_DIM * ELT
    token, nbytes = s.checkpoint(rewrites=True), s.memory()["kv_bytes"]
    s.feed(prompt(80, seed=1), compress=True, sparse=False)  # fires again on (possibly) ragged layers
    s.generate(4)
    s.rollback(token)
    assert s.memory()["kv_bytes"] == nbytes


def test_adakv_same_bytes_as_snapkv_uneven_heads(engine):
    sizes = {}
    for name in ("snapkv", "adakv"):
        s = engine.session(method({"name": name, "budget": 64}))
        s.feed(prompt(300), compress=True, sparse=False)
        sizes[name] = s.memory()["kv_bytes"]
        if name == "adakv":
            assert any(len(set(layer.lengths)) > 1 for layer in s.cache.layers)
    assert sizes["snapkv"] == sizes["adakv"]


@pytest.mark.parametrize("cfg", [{"name": "kvzip", "budget": 400, "chunk": 64}, {"name": "adakv", "budget": 400}])
def test_within_budget_decodes_as_full(engine, cfg):
    """Nothing evicted: the same tokens as full attention (KVzip's repeat forwards leave no trace in the cache)."""
    ids = prompt(200)
    outs = []
    for c in ({"name": "full"}, cfg):
        s = engine.session(method(c))
        s.feed(ids, compress=True, sparse=False)
        outs.append(s.generate(8).tokens)
    assert outs[0] == outs[1]


def test_duo_bad_gates_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gates": "x"}))
    with pytest.raises(ValueError, match="gates"):
        method({"name": "duo_attention", "heads": str(bad)})
    with pytest.raises(ValueError, match="no file"):
        method({"name": "duo_attention", "heads": str(tmp_path / "missing.json")})
    with pytest.raises(ValueError, match="level"):
        method({"name": "kvzip", "level": "global"})


def make_example():
    words = " ".join(f"key{i}=val{i * 7 % 97}" for i in range(24))
    turns = tuple(Turn(input=f'Key: "key{i}"\nThe value is: ', answer=f"val{i * 7 % 97}") for i in (3, 17))
    return Example(id="tiny", context=words, turns=turns)


@pytest.mark.parametrize("cfg", [CASES[0], CASES[2], CASES[4], CASES[5]], ids=[IDS[0], IDS[2], IDS[4], IDS[5]])
def test_runner_both_modes_all_policies(engine, cfg, gates_file):
    if cfg["name"] == "duo_attention":
        cfg = {**cfg, "heads": gates_file}
    task = TASKS.get("scbench_kv")
    for mode in ("multi_turn", "multi_request"):
        for compress in ("once", "every_turn", "decode_every"):
            spec = RunSpec(model={}, method=cfg, task="scbench_kv", mode=mode, max_turns=2, max_new_tokens=6,
                           compress=compress, decode_interval=2)
            results = list(Replay(engine, method(cfg), task, make_example(), spec))
            assert [r.turn for r in results] == [0, 1]
            st = dataclasses.asdict(results[0].stats)
            assert 0 < st["kv_bytes"] < st["kv_full_bytes"] and st["compress_s"] > 0
            if cfg["name"] == "kvzip":  # the reconstruction prefill, a declared cost of the turn that compressed
                assert results[0].stats.method_costs["score_prefill_s"] > 0
                assert results[0].stats.method_costs["score_prefill_tokens"] > 0
                if compress == "once":
                    assert results[1].stats.method_costs["score_prefill_s"] == 0


@pytest.mark.parametrize("cfg", [{"name": "snapkv", "budget": 48, "window": 8}, {"name": "h2o", "budget": 48},
                                 {"name": "streamingllm", "n_init": 4, "n_local": 44}, {"name": "pyramidkv", "budget": 48},
                                 {"name": "adakv", "budget": 48, "window": 8}, {"name": "kvzip", "budget": 48}])
def test_decode_every_keeps_the_budget(engine, cfg):
    """A long generation stays within budget + interval tokens per head; without the policy it grows past it."""
    for every, cap in ((None, None), (8, None), (8, 52)):
        s = engine.session(method(cfg))
        s.feed(prompt(200), compress=True, sparse=False)
        gen = s.generate(60, compress_every=every, compress_cap=cap)
        lengths = [max(getattr(layer, "head_lengths", lambda: [layer.get_seq_length()])()) for layer in s.cache.layers]
        steps = len(gen.tokens) - 1
        if every is None:
            assert max(lengths) >= 48 + min(steps, 40) - 1
        elif steps >= 16:
            assert max(lengths) <= (cap or 48) + every and gen.compress_s > 0


def test_decode_every_turn_records_and_run_ids(engine):
    from scbench.run import run_spec_dict

    cfg = {"name": "snapkv", "budget": 48, "window": 8}
    once = RunSpec(model={}, method=cfg, task="scbench_kv")
    assert "decode_interval" not in run_spec_dict(once)  # runs of the other policies keep their ids
    spec = RunSpec(model={}, method=cfg, task="scbench_kv", mode="multi_request", max_turns=2, max_new_tokens=40,
                   compress="decode_every", decode_interval=4)
    assert run_spec_dict(spec)["decode_interval"] == 4
    for r in Replay(engine, method(cfg), TASKS.get("scbench_kv"), make_example(), spec):
        assert r.stats.kv_tokens <= 48 + 4  # the cache size at the end of the turn
    with pytest.raises(ValueError, match="decode_interval"):
        dataclasses.replace(spec, decode_interval=0).validate()


def test_decode_every_without_firing_equals_once(engine):
    """An interval longer than the generation never fires: the same predictions and caches as compress=once (the
    multi-turn rollback to the pre-generation cache is exact)."""
    cfg = {"name": "adakv", "budget": 48, "window": 8}
    preds = {}
    for compress, kw in (("once", {}), ("decode_every", {"decode_interval": 1000})):
        spec = RunSpec(model={}, method=cfg, task="scbench_kv", mode="multi_turn", max_turns=2, max_new_tokens=8,
                       compress=compress, **kw)
        rs = list(Replay(engine, method(cfg), TASKS.get("scbench_kv"), make_example(), spec))
        preds[compress] = [(r.prediction, r.stats.kv_bytes) for r in rs]
    assert preds["once"] == preds["decode_every"]


def test_llama8b_timing_gates_fit_the_bench_shape():
    """configs/method/duo_attention-llama8b.yaml: its gates file fits the random Llama-3.1-8B's 32 x 8 KV heads."""
    from omegaconf import OmegaConf

    from scbench.cli import config_dir

    cfg = OmegaConf.to_container(OmegaConf.load(config_dir() / "method" / "duo_attention-llama8b.yaml"))
    m = method(cfg)
    assert m.retrieval(31, 8).sum() + sum(int(m.retrieval(i, 8).sum()) for i in range(31)) == 128
    with pytest.raises(ValueError, match="another model"):
        m.retrieval(0, 2)


def duo_against_table(tmp_path, gates, b, tq, tk, n_local, check=None) -> set[int]:
    """DuoAttention (4 KV heads x 2) on random float32 inputs, layer by layer: its prefill equals the per-head
    pattern table's path (``prefill_attention_reference``) and counts the same cells; ``check(duo, layer)`` runs
    first. Returns the counts of retrieval KV heads the layers had."""
    from scbench.engines.attention import AttnContext, active

    path = tmp_path / "gates.json"
    path.write_text(json.dumps({"gates": gates}))
    duo = method({"name": "duo_attention", "heads": str(path), "n_init": 8, "n_local": n_local,
                  "retrieval_ratio": 0.5})
    g = torch.Generator().manual_seed(tq + tk)
    q = torch.randn(b, 8, tq, HEAD_DIM, generator=g)
    k, v = (torch.randn(b, 4, tk, HEAD_DIM, generator=g) for _ in range(2))
    kinds = set()
    for layer in range(len(gates)):
        kinds.add(int(duo.retrieval(layer, 4).sum()))
        if check is not None:
            check(duo, layer)
        ctx, ref_ctx = AttnContext(), AttnContext()
        with active(ctx):
            out = duo.prefill_attention(layer, q, k, v, None)
        with active(ref_ctx):
            ref = duo.prefill_attention_reference(layer, q, k, v, None)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert ctx.cells_computed == ref_ctx.cells_computed > 0
    return kinds


@pytest.mark.parametrize("gates", [[[0.9, 0.1, 0.2, 0.7], [0.2, 0.8, 0.3, 0.1], [0.9, 0.95, 0.8, 0.85],
                                    [0.0, 0.1, 0.05, 0.02]]])
@pytest.mark.parametrize("tq,tk,b", [(300, 300, 1), (97, 410, 1), (200, 200, 2)])
def test_duo_split_prefill_matches_the_pattern_table(tmp_path, gates, tq, tk, b):
    """DuoAttention's prefill split by head kind (retrieval heads dense through SDPA, streaming heads through the
    A-shape band) equals the per-head pattern table's path on random float32 inputs, and counts the same cells; the
    layers cover mixed, all-retrieval and all-streaming heads, a chunk over a cache and two batch rows."""
    assert duo_against_table(tmp_path, gates, b, tq, tk, 40) == {0, 2, 4}  # retrieval KV heads: none, some, all


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("tq,tk", [(384, 384), (256, 640)])
def test_duo_flex_band_over_every_head_matches_the_pattern_table(tmp_path, monkeypatch, tq, tk):
    """The GPU branch on the CPU (eager FlexAttention): one band call over every query head, the retrieval heads
    listed with no block and overwritten by SDPA's dense rows, equals the per-head pattern table's path."""
    from torch.nn.attention.flex_attention import flex_attention

    from scbench.kernels import flex
    from scbench.methods import duo_attention as duo_mod

    monkeypatch.setattr(duo_mod, "use_flex", lambda q, tq: True)
    monkeypatch.setattr(flex, "compiled_flex", lambda: flex_attention)
    monkeypatch.setattr(flex, "KERNEL_OPTIONS", {})
    duo_mod._band_lists.cache_clear()

    def blocks_for_streaming_heads_only(duo, layer):
        streaming = ~duo.retrieval(layer, 4).repeat_interleave(2)
        bm = duo_mod._streaming_block_mask(tq, tk, 8, 140, streaming, "cpu")
        assert ((bm.kv_num_blocks[0] + bm.full_kv_num_blocks[0]).sum(-1) > 0).tolist() == streaming.tolist()

    gates = [[0.9, 0.1, 0.8, 0.2], [0.1, 0.1, 0.1, 0.1], [0.3, 0.7, 0.05, 0.01]]
    assert duo_against_table(tmp_path, gates, 1, tq, tk, 140, blocks_for_streaming_heads_only) == {0, 2, 4}
