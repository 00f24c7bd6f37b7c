"""RetrievalAttention (methods/retrieval_attention.py): exact search against torch.topk over float64 scores, the
static pattern, and decoding through the engine and the runner on a tiny random Llama."""
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from scbench.run import build_method
from scbench.methods.full import FullAttention
from scbench.methods.retrieval_attention import RetrievalAttention, top_keys
from scbench.records import Example, RunSpec, Turn
from scbench.registry import TASKS
from scbench.runner import Replay

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "method"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("group", [False, True])
def test_exact_search_equals_topk_of_float64_scores(group):
    q, keys = rand(2, 6, 32, seed=1), rand(2, 2, 500, 32, seed=2)
    got = top_keys(q, keys, 37, group)
    scores = torch.einsum("bhd,bhnd->bhn", q.double(), keys.double().repeat_interleave(3, dim=1))
    if group:
        scores = scores.unflatten(1, (2, 3)).amax(2)
    want = torch.topk(scores, 37, dim=-1).indices
    assert got.shape == want.shape
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_select_adds_the_static_pattern_once():
    m = RetrievalAttention(top_k=20, n_init=4, n_local=8)
    q, keys = rand(1, 4, 16, seed=3), rand(1, 2, 100, 16, seed=4)
    idx = m.select(q, keys)
    assert idx.shape == (1, 4, 4 + 8 + 20)
    for h in range(4):
        rows = idx[0, h].tolist()
        assert len(set(rows)) == len(rows)
        assert set(range(4)) | set(range(92, 100)) <= set(rows)
        middle = sorted(r for r in rows if 4 <= r < 92)
        scores = keys[0, h // 2, 4:92] @ q[0, h]
        assert middle == sorted((torch.topk(scores.double(), 20).indices + 4).tolist())
    assert RetrievalAttention(top_k=88, n_init=4, n_local=8).select(q, keys) is None


def test_bad_knobs_name_the_field():
    for kw, field in [({"top_k": 0}, "top_k"), ({"n_local": 0}, "n_local"), ({"n_init": -1}, "n_init"),
                      ({"gqa": "x"}, "gqa"), ({"tier": "disk"}, "tier")]:
        with pytest.raises(ValueError, match=f"RetrievalAttention.{field}"):
            RetrievalAttention(**kw)


@pytest.fixture(scope="module")
def engine(smol_tokenizer):
    from support import make_tiny_engine

    return make_tiny_engine(smol_tokenizer, layers=2)


def decode(engine, method, n_prompt, n=10, seed=0):
    prompt = torch.randint(5, 2000, (n_prompt,), generator=torch.Generator().manual_seed(seed)).tolist()
    s = engine.session(method)
    s.feed(prompt, compress=True, sparse=False)
    return s, s.generate(n)


def test_top_k_covering_the_context_decodes_like_full_attention(engine):
    _, full = decode(engine, FullAttention(), 250)
    _, gen = decode(engine, RetrievalAttention(top_k=256, n_init=4, n_local=16), 250)
    assert gen.tokens == full.tokens


def test_loads_static_plus_top_k_rows_per_head_and_step(engine):
    m = RetrievalAttention(top_k=32, n_init=4, n_local=16, recall=True)
    s, gen = decode(engine, m, 300)
    mem = s.memory()
    steps, layers, heads, row = len(gen.tokens) - 1, 2, 4, 2 * 16 * 4
    assert mem["loaded_bytes"] == steps * layers * heads * (4 + 16 + 32) * row
    assert 0 < mem["attn_recall"] < 1
    _, gen_group = decode(engine, RetrievalAttention(top_k=32, n_init=4, n_local=16, gqa="group"), 300)
    assert len(gen_group.tokens) == len(gen.tokens)


def test_configs_and_runner_both_modes(engine):
    for name, k in [("retrieval_attention", 4096), ("retrieval_attention-1k", 192)]:
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert build_method(cfg).top_k == k
    words = " ".join(f"key{i}=val{i * 7 % 97}" for i in range(60))
    example = Example(id="tiny", context=words, turns=tuple(Turn(input=f"key{i}?", answer=f"val{i}") for i in (3, 17)))
    cfg = {"name": "retrieval_attention", "top_k": 24, "n_init": 4, "n_local": 8}
    for mode, compress in [("multi_turn", "once"), ("multi_request", "once"), ("multi_request", "every_turn")]:
        spec = RunSpec(model={}, method=cfg, task="scbench_kv", mode=mode, max_turns=2, max_new_tokens=5,
                       compress=compress)
        results = list(Replay(engine, build_method(cfg), TASKS.get("scbench_kv"), example, spec))
        assert [r.turn for r in results] == [0, 1]
        for r in results:
            assert dataclasses.asdict(r.stats)["loaded_bytes"] > 0


def test_search_index_for_half_precision_host_keys_follows_appends_and_crops():
    from scbench.kv.offload import TieredLayer

    k, v = rand(1, 2, 100, 8, seed=5).bfloat16(), rand(1, 2, 100, 8, seed=6).bfloat16()
    layer = TieredLayer(k, v, storage="cpu")
    m = RetrievalAttention()
    assert torch.equal(m.search_keys(layer), layer.keys.float())
    layer.update(*(rand(1, 2, 7, 8, seed=7).bfloat16() for _ in range(2)))
    layer.scbench_crop(90)
    layer.update(rand(1, 2, 5, 8, seed=8).bfloat16(), rand(1, 2, 5, 8, seed=9).bfloat16())
    index = m.search_keys(layer)
    assert torch.equal(index, layer.keys.float()) and index.dtype == torch.float32
    assert layer.scbench_slow_nbytes() == 0 and layer.scbench_nbytes() == 95 * 2 * 8 * (2 + 2 + 4)  # CPU compute


def test_topk_recall_by_hand():
    from scbench.methods.retrieval_attention import topk_recall

    exact = torch.tensor([[[0, 1, 2, 3], [4, 5, 6, 7]]])
    approx = torch.tensor([[[3, 1, 8, 9], [7, 6, 5, 4]]])  # head 0: 2 of 4, head 1: 4 of 4
    assert topk_recall(approx, exact, 10) == pytest.approx(0.75)


def test_missing_faiss_names_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match="faiss-cpu"):
        RetrievalAttention(index="faiss_ivf")
    with pytest.raises(ValueError, match="RetrievalAttention.index"):
        RetrievalAttention(index="annoy")
    RetrievalAttention()  # exact search needs no faiss


@pytest.mark.parametrize("group", [False, True])
def test_exhaustive_ivf_returns_the_exact_top_k_set(group):
    pytest.importorskip("faiss")
    m = RetrievalAttention(top_k=40, n_init=4, n_local=8, gqa="group" if group else "head", index="faiss_ivf",
                           nlist=8, nprobe=8, recall=True)
    layer = m.compress_cache(0, rand(2, 2, 600, 16, seed=10), rand(2, 2, 600, 16, seed=11), None)
    assert layer.ann.end == 600 - 8 and layer.index_build_s > 0
    # generated rows: searched exactly as the tail, then added to the index
    for step, extra in enumerate([3, 300]):
        layer.update(rand(2, 2, extra, 16, seed=20 + step), rand(2, 2, extra, 16, seed=30 + step))
        keys = m.search_keys(layer)
        q = rand(2, 4, 16, seed=40 + step)
        got = m.select(q, keys, layer)
        hi = layer.n - 8
        want = top_keys(q, keys[..., 4:hi, :], 40, group) + 4
        assert torch.equal(got[..., 12:].sort(-1).values, want.sort(-1).values)
    assert layer.ann.end == layer.n - 8  # 300 new rows >= EXTEND_EVERY: extended
    assert layer.index_recall_n == 2 and layer.index_recall_sum == pytest.approx(2.0)
    layer.scbench_crop(500)  # below the indexed rows: rebuilt
    m.search_keys(layer)
    assert layer.ann.end == 500 - 8 and layer.ann.parts[0].ntotal == 500 - 8 - 4


@pytest.mark.parametrize("index", ["faiss_ivf", "faiss_hnsw"])
def test_index_bytes_match_the_serialised_indices(index):
    """AnnIndex.nbytes reads the faiss structures; faiss.serialize_index writes the same arrays plus headers."""
    faiss = pytest.importorskip("faiss")
    m = RetrievalAttention(top_k=40, n_init=4, n_local=8, index=index, nlist=8, nprobe=8, hnsw_m=8)
    layer = m.compress_cache(0, rand(1, 2, 900, 32, seed=12), rand(1, 2, 900, 32, seed=13), None)
    got = layer.ann.nbytes()
    serial = sum(len(faiss.serialize_index(ix)) for ix in layer.ann.parts)
    codes = 2 * (900 - 12) * 32 * 4  # the float32 copy of the indexed keys alone
    assert codes < got <= serial <= got + 2 * 4096, (got, serial)


def test_approximate_index_records_recall_per_turn(engine):
    pytest.importorskip("faiss")
    for index in ("faiss_ivf", "faiss_hnsw"):
        m = RetrievalAttention(top_k=32, n_init=4, n_local=16, recall=True, index=index, nprobe=4)
        s, gen = decode(engine, m, 300)
        mem = m.take_costs(s)
        assert 0 < mem["index_recall"] <= 1 and mem["index_build_s"] > 0 and mem["index_bytes"] > 0
        again = m.take_costs(s)
        assert again["index_recall"] is None and again["index_bytes"] == mem["index_bytes"]  # held, not reset
    cfg = yaml.safe_load((CONFIGS / "retrieval_attention-ivf.yaml").read_text())
    assert build_method(cfg).index == "faiss_ivf"
    words = " ".join(f"key{i}=val{i * 7 % 97}" for i in range(60))
    example = Example(id="tiny", context=words, turns=tuple(Turn(input=f"key{i}?", answer=f"val{i}") for i in (3, 17)))
    cfg = {"name": "retrieval_attention", "top_k": 24, "n_init": 4, "n_local": 8, "index": "faiss_hnsw", "recall": True}
    for mode, compress in [("multi_turn", "once"), ("multi_request", "once"), ("multi_request", "every_turn")]:
        spec = RunSpec(model={}, method=cfg, task="scbench_kv", mode=mode, max_turns=2, max_new_tokens=5,
                       compress=compress)
        for r in Replay(engine, build_method(cfg), TASKS.get("scbench_kv"), example, spec):
            assert 0 < r.stats.method_costs["index_recall"] <= 1 and r.stats.method_costs["index_bytes"] > 0


def test_ivf_with_fewer_candidates_than_k_still_returns_k_distinct_rows():
    pytest.importorskip("faiss")
    m = RetrievalAttention(top_k=40, n_init=4, n_local=8, index="faiss_ivf", nlist=64, nprobe=1)
    layer = m.compress_cache(0, rand(1, 2, 600, 16, seed=12), rand(1, 2, 600, 16, seed=13), None)
    q = rand(1, 4, 16, seed=14)
    got = m.select(q, m.search_keys(layer), layer)[0, :, 12:]  # [heads, k] past the static rows
    for h in range(4):
        _, found = layer.ann.parts[h // 2].search(q[0, h : h + 1].numpy(), 40)
        found = {i + 4 for i in found[0].tolist() if i >= 0}
        rows = got[h].tolist()
        assert 0 < len(found) < 40 and found <= set(rows)
        assert len(set(rows)) == 40 and all(4 <= r < 592 for r in rows)
