"""Quest (methods/quest.py): page bounds and page selection against plain references, the bounds kept up to date
through appends and crops, and decoding through the engine and the runner on a tiny random Llama."""
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from scbench.run import build_method
from scbench.kv.offload import TieredLayer
from scbench.methods.full import FullAttention
from scbench.methods.quest import Quest, page_bounds, page_scores, reference_page_scores
from scbench.records import Example, RunSpec, Turn
from scbench.registry import TASKS
from scbench.runner import Replay

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "method"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_page_bounds_match_plain_loop():
    keys = rand(2, 3, 53, 5)
    lo, hi = page_bounds(keys, 8)
    assert lo.shape == hi.shape == (2, 3, 6, 5)  # the partial last page has no bounds
    for p in range(6):
        page = keys[:, :, p * 8 : (p + 1) * 8]
        for c in range(5):
            assert torch.equal(lo[:, :, p, c], page[..., c].min(-1).values)
            assert torch.equal(hi[:, :, p, c], page[..., c].max(-1).values)


def test_page_scores_equal_reference_and_bound_every_key():
    keys, q = rand(2, 2, 64, 16, seed=1), rand(2, 6, 16, seed=2)  # GQA: 6 query heads on 2 KV heads
    q[0, 0, :4] = 0.0
    lo, hi = page_bounds(keys, 8)
    fast = page_scores(q, lo, hi)
    torch.testing.assert_close(fast.double(), reference_page_scores(q, lo, hi), rtol=1e-5, atol=1e-5)
    exact = torch.einsum("bhd,bhnd->bhn", q, keys.repeat_interleave(3, dim=1)).unflatten(-1, (8, 8)).amax(-1)
    assert (fast >= exact - 1e-5).all()


def reference_select(m: Quest, q: torch.Tensor, keys: torch.Tensor) -> list[list[set[int]]]:
    """Per batch row and selecting head: the set of rows a plain reading of Quest attends."""
    b, hq, _ = q.shape
    hkv, n, p = keys.shape[1], keys.shape[2], m.page_size
    last = (n - 1) // p
    recent = set(range(max(0, (last - m.recent_pages + 1) * p), n))
    cand = min(r for r in recent) // p
    pick = (m.budget - len(recent)) // p
    lo, hi = page_bounds(keys, p)
    scores = reference_page_scores(q, lo[..., :cand, :], hi[..., :cand, :])
    if m.gqa == "group":
        scores = scores.unflatten(1, (hkv, hq // hkv)).amax(2)
    out = []
    for i in range(b):
        rows = []
        for h in range(scores.shape[1]):
            order = sorted(range(cand), key=lambda j: -float(scores[i, h, j]))[:pick]
            rows.append({j * p + t for j in order for t in range(p)} | recent)
        out.append(rows)
    return out


@pytest.mark.parametrize("gqa", ["head", "group"])
@pytest.mark.parametrize("budget,recent,n", [(64, 1, 200), (48, 2, 197), (100, 1, 161)])
def test_select_matches_reference(gqa, budget, recent, n):
    m = Quest(budget=budget, page_size=8, recent_pages=recent, gqa=gqa)
    keys, q = rand(2, 2, n, 16, seed=n), rand(2, 4, 16, seed=n + 1)
    lo, hi = page_bounds(keys, 8)
    idx = m.select(q, lo, hi, n)
    assert idx.shape[:2] == (2, 4 if gqa == "head" else 2) and idx.shape[-1] <= budget
    want = reference_select(m, q, keys)
    for i in range(2):
        for h in range(idx.shape[1]):
            assert sorted(idx[i, h].tolist()) == sorted(want[i][h])


def test_budget_covering_every_row_selects_none():
    m = Quest(budget=64, page_size=8)
    lo, hi = page_bounds(rand(1, 2, 64, 4), 8)
    assert m.select(rand(1, 2, 4), lo, hi, 64) is None
    assert m.select(rand(1, 2, 4), lo, hi, 65) is not None


def test_bad_knobs_name_the_field():
    for kw, field in [({"budget": 0}, "budget"), ({"page_size": -1}, "page_size"), ({"gqa": "mean"}, "gqa"),
                      ({"tier": "disk"}, "tier"), ({"budget": 8, "page_size": 16}, "budget"),
                      ({"dense_layers": -1}, "dense_layers")]:
        with pytest.raises(ValueError, match=f"Quest.{field}"):
            Quest(**kw)


@pytest.fixture(scope="module")
def engine(smol_tokenizer):
    from support import make_tiny_engine

    return make_tiny_engine(smol_tokenizer, layers=3)


def ids(n, seed=0):
    return torch.randint(5, 2000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode(engine, method, prompt, n=12):
    s = engine.session(method)
    s.feed(prompt, compress=True, sparse=False)
    return s, s.generate(n)


def test_budget_covering_the_context_decodes_like_full_attention(engine):
    prompt = ids(300)
    _, full = decode(engine, FullAttention(), prompt)
    for tier in ("device", "cpu"):
        s, gen = decode(engine, Quest(budget=1024, page_size=16, dense_layers=1, tier=tier), prompt)
        assert gen.tokens == full.tokens
        assert all(isinstance(layer, TieredLayer) for layer in s.cache.layers)


def test_small_budget_loads_its_budget_and_reports_recall(engine):
    prompt = ids(400, seed=3)
    m = Quest(budget=64, page_size=16, dense_layers=1, recall=True)
    s, gen = decode(engine, m, prompt)
    mem = s.memory()
    steps = len(gen.tokens) - 1
    row = 2 * 16 * 4  # keys + values, head_dim 16, float32
    dense = sum(2 * (400 + i) * row for i in range(1, steps + 1))  # layer 0: every row of its 2 KV heads
    sparse = 2 * steps * 4 * 64 * row  # layers 1-2: 4 query heads x 64 rows (the recent page is full here or not)
    assert dense < mem["loaded_bytes"] <= dense + sparse
    assert 0 < mem["attn_recall"] < 1
    assert s.memory()["loaded_bytes"] == 0  # counters are per call (one call per turn)


def test_bounds_follow_appends_and_crops(engine):
    m = Quest(budget=64, page_size=16, dense_layers=0)
    s, gen = decode(engine, m, ids(203, seed=4), n=20)
    s.drop_last(len(gen.tokens) + 30)  # crop into pages that held bounds
    s.feed(ids(45, seed=5), compress=False, sparse=False)  # different tokens where cropped ones were
    s.generate(3)
    for layer in s.cache.layers:
        lo, hi = page_bounds(layer.keys, 16)
        have = m.bounds(layer)
        assert torch.equal(have[0], lo) and torch.equal(have[1], hi)


def test_configs_and_runner_both_modes(engine):
    for name, budget in [("quest", 4096), ("quest-ref", 1024), ("quest-1k", 256)]:
        cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert build_method(cfg).budget == budget
    words = " ".join(f"key{i}=val{i * 7 % 97}" for i in range(60))
    example = Example(id="tiny", context=words, turns=tuple(Turn(input=f"key{i}?", answer=f"val{i}") for i in (3, 17)))
    cfg = {"name": "quest", "budget": 32, "page_size": 8, "dense_layers": 1}
    for mode, compress in [("multi_turn", "once"), ("multi_request", "once"), ("multi_request", "every_turn")]:
        spec = RunSpec(model={}, method=cfg, task="scbench_kv", mode=mode, max_turns=2, max_new_tokens=5,
                       compress=compress)
        results = list(Replay(engine, build_method(cfg), TASKS.get("scbench_kv"), example, spec))
        assert [r.turn for r in results] == [0, 1]
        for r in results:
            st = dataclasses.asdict(r.stats)
            assert st["loaded_bytes"] > 0  # resident: the whole KV plus the page bounds (2 rows per 8-row page)
            assert st["kv_full_bytes"] < st["kv_bytes"] <= st["kv_full_bytes"] * (1 + 1 / 8)
