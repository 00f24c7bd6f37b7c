"""RetrievalAttention (methods/retrieval_attention.py): exact search against torch.topk over float64 scores, the
static pattern, and decoding through the engine and the runner on a tiny random Llama."""
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from scbench.evaluate import build_method
from scbench.methods.full import FullAttention
from scbench.methods.retrieval_attention import RetrievalAttention, top_keys
from scbench.records import Example, RunSpec, Turn
from scbench.registry import TASKS
from scbench.runner import Replay

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "method"


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
    from conftest import make_tiny_engine

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
