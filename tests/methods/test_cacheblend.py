"""CacheBlend chunk KV reuse (methods/cacheblend.py, scbench/engines/blend.py).

RoPE re-rotation against a float64 reference and against keys computed at the true positions; 100% recompute
equals a full prefill (tiny random Llama and the embedded model); 0% equals plain concatenation of chunks
computed at their true positions; the deviation top-k against a plain loop; runs through the runner in both modes.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from scbench.engines import blend
from scbench.engines.base import cache_kw
from scbench.methods.cacheblend import CacheBlend
from scbench.records import RunSpec
from scbench.registry import METHODS, TASKS
from scbench.runner import Replay


@pytest.fixture(scope="module")
def engine(smol_tokenizer):
    from support import make_tiny_engine

    return make_tiny_engine(smol_tokenizer, seed=3, layers=4)


def random_ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 5000, (n,), generator=g).tolist()


def full_prefill(engine, ids):
    """A plain prefill through the engine: (cache, last logits)."""
    s = engine.session(METHODS.get("full")())
    s.feed(ids, compress=False, sparse=False)
    return s.cache, s.last_logits


def blended(engine, ids, **knobs):
    s = engine.session(CacheBlend(**knobs))
    fs = s.feed(ids, compress=True, sparse=True)
    return s, fs, s.method.take_costs(s)


def test_rerotate_matches_float64_rotation(engine):
    """rerotate(k, shift) = the rotate-half RoPE rotation by shift * inv_freq, computed plainly in float64."""
    rotary = engine.model.model.rotary_emb
    k = torch.randn(1, 2, 7, engine.head_dim)
    shift = torch.tensor([0, 1, 5, 17, 100, 1000, 4000])
    half = engine.head_dim // 2
    angle = shift[:, None].double() * rotary.inv_freq.double()[None, :]  # [T, D/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = k[..., :half].double(), k[..., half:].double()
    want = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    # float32 angles (as transformers computes them) lose ~1e-4 rad at position 4000
    torch.testing.assert_close(blend.rerotate(k, shift, rotary).double(), want, atol=5e-4, rtol=1e-3)


def test_chunk_kv_matches_true_positions(engine):
    """Layer 0 keys/values depend on no other token: re-rotated chunk KV equals the full prefill's at every
    position. The first chunk starts at its true position, so all its layers equal the full prefill's."""
    ids = random_ids(70)
    keys, values = blend.chunk_kv(engine.model, ids, chunk_size=16, prefix=0)
    cache, _ = full_prefill(engine, ids)
    torch.testing.assert_close(keys[0], cache.layers[0].keys, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(values[0], cache.layers[0].values, atol=1e-5, rtol=1e-4)
    for i, layer in enumerate(cache.layers):
        torch.testing.assert_close(keys[i][:, :, :16], layer.keys[:, :, :16], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(values[i][:, :, :16], layer.values[:, :, :16], atol=1e-5, rtol=1e-4)
    # deeper layers of later chunks miss the attention to earlier chunks
    assert not torch.allclose(keys[-1][:, :, 16:], cache.layers[-1].keys[:, :, 16:], atol=1e-3)


@pytest.mark.parametrize("n,chunk,prefix,batch", [(70, 16, 0, 16), (70, 16, 0, 48), (90, 16, 3, 10**6),
                                                   (100, 16, 16, 64), (33, 16, 40, 32), (301, 32, 5, 100),
                                                   (20, 16, 12, 10**6)])
def test_batched_chunk_kv_matches_one_forward_per_chunk(engine, n, chunk, prefix, batch):
    """The batched chunk KV (chunks of one input length as the rows of a forward, each layer re-rotated once) equals
    the loop of one forward per chunk (the reference), with the last, shorter chunk, a shared prefix, a prefix as long
    as a chunk (a chunk at its true position: not re-rotated), one longer than the tokens, and a last chunk whose
    prefix makes it as long as the first, which has none (20 tokens, chunks of 16, prefix 12)."""
    ids = random_ids(n, seed=n + prefix)
    want_k, want_v = blend.chunk_kv_loop(engine.model, ids, chunk, prefix)
    got_k, got_v = blend.chunk_kv(engine.model, ids, chunk, prefix, batch_tokens=batch)
    assert len(got_k) == len(want_k) == engine.num_layers
    for a, b in zip(got_k + got_v, want_k + want_v):
        assert a.shape == b.shape == (1, engine.kv_heads, n, engine.head_dim)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prefix", [0, 3])
def test_full_recompute_equals_full_prefill(engine, prefix):
    ids = random_ids(90, seed=1)
    cache, logits = full_prefill(engine, ids)
    s, fs, costs = blended(engine, ids, chunk_size=20, recompute_ratio=1.0, prefix=prefix, measure_full=False)
    torch.testing.assert_close(s.last_logits, logits, atol=1e-5, rtol=1e-4)
    for a, b in zip(s.cache.layers, cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
    assert costs["recompute_frac"] == 1.0 and fs.attn_density == 1.0 and s.pos == len(ids)


def test_zero_recompute_equals_plain_concatenation(engine):
    """0%: the cache is the chunks' KV as if each chunk had been computed alone at its true positions, and the
    last token is computed over it."""
    ids = random_ids(75, seed=2)
    ref = DynamicCache(config=engine.model.config)
    parts = []
    with torch.inference_mode():
        for s, e in blend.chunk_spans(len(ids) - 1, 16):
            c = DynamicCache(config=engine.model.config)
            engine.model(input_ids=torch.tensor([ids[s:e]]), position_ids=torch.arange(s, e)[None], **{cache_kw(engine.model): c},
                         use_cache=True)
            parts.append(c)
        for i in range(engine.num_layers):
            ref.update(torch.cat([c.layers[i].keys for c in parts], 2),
                       torch.cat([c.layers[i].values for c in parts], 2), i)
        logits = engine.model(input_ids=torch.tensor([ids[-1:]]), position_ids=torch.tensor([[len(ids) - 1]]),
                              **{cache_kw(engine.model): ref}, use_cache=True).logits[0, -1]
    s, fs, costs = blended(engine, ids, chunk_size=16, recompute_ratio=0.0, measure_full=False)
    for a, b in zip(s.cache.layers, ref.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s.last_logits, logits, atol=1e-5, rtol=1e-4)
    assert costs["recompute_frac"] == pytest.approx(1 / len(ids))


def test_partial_recompute_touches_only_selected_tokens(engine):
    """15%: deep layers keep the stored chunk KV of unselected tokens and take fresh KV for the selected ones."""
    ids = random_ids(81, seed=4)
    keys, values = blend.chunk_kv(engine.model, ids[:-1], chunk_size=16, prefix=0)
    s, fs, costs = blended(engine, ids, chunk_size=16, recompute_ratio=0.15, select_layer=1, measure_full=True)
    n_sel = math.ceil(0.15 * 80)
    assert costs["recompute_frac"] == pytest.approx((n_sel + 1) / 81)
    assert costs["chunk_kv_s"] > 0 and "prefill_saved_s" in costs
    deep = s.cache.layers[3].keys[0, 0, :80]
    same = torch.isclose(deep, keys[3][0, 0], atol=1e-6).all(-1)
    assert int((~same).sum()) <= n_sel and int(same.sum()) >= 80 - n_sel
    full_layer = s.cache.layers[1].keys[0, 0, :80]  # layers 0..select_layer are recomputed for every token
    torch.testing.assert_close(full_layer, full_prefill(engine, ids)[0].layers[1].keys[0, 0, :80], atol=1e-5, rtol=1e-4)
    assert 0 < fs.attn_density < 1


def test_select_tokens_matches_plain_loop():
    g = torch.Generator().manual_seed(0)
    fresh, stored = torch.randn(1, 3, 50, 8, generator=g), torch.randn(1, 3, 50, 8, generator=g)
    dev = [sum(float((fresh[0, h, t] - stored[0, h, t]).pow(2).sum()) for h in range(3)) for t in range(50)]
    want = sorted(sorted(range(50), key=lambda t: -dev[t])[:8])  # ceil(0.15 * 50) = 8
    assert blend.select_tokens(fresh, stored, 0.15).tolist() == want


@pytest.mark.parametrize("room", [1, 3])
def test_chunk_kv_room(engine, room):
    """``chunk_kv(..., room=r)``: per layer one buffer of n + r positions, the chunk KV (as with no room) first and
    zeros in the r slots after, each layer its own tensor (nothing shared between layers or keys and values)."""
    ids = random_ids(70, seed=9)
    want_k, want_v = blend.chunk_kv(engine.model, ids, 16, 0)
    got_k, got_v = blend.chunk_kv(engine.model, ids, 16, 0, room=room)
    for a, b in zip(got_k + got_v, want_k + want_v):
        assert a.shape == (1, engine.kv_heads, 70 + room, engine.head_dim)
        assert torch.equal(a[:, :, :70], b) and not a[:, :, 70:].any()
    assert len({x.data_ptr() for x in got_k + got_v}) == 2 * engine.num_layers


def test_blended_forward_takes_the_slot_or_pads_and_replaces_the_lists(engine):
    """Stored KV with the last token's slot (``room=1``) blends to the same logits and cache as without it (padded
    layer by layer); the caller's lists are the blend's working buffers (their tensors replaced, so the stored KV is
    not held beside the blended one); one list for keys and values, or a wrong length, is refused by name."""
    ids = random_ids(81, seed=5)
    k0, v0 = blend.chunk_kv(engine.model, ids[:-1], 16, 0)
    k1, v1 = blend.chunk_kv(engine.model, ids[:-1], 16, 0, room=1)
    before = [x.data_ptr() for x in k0]
    got0 = blend.blended_forward(engine.model, ids, k0, v0, ratio=0.15, select_layer=1)
    got1 = blend.blended_forward(engine.model, ids, k1, v1, ratio=0.15, select_layer=1)
    torch.testing.assert_close(got0[0], got1[0], atol=0, rtol=0)
    for a, b in zip(got0[1] + got0[2], got1[1] + got1[2]):
        assert a.shape == (1, engine.kv_heads, 81, engine.head_dim)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(got0[3], got1[3]) and got0[4] == got1[4] == 2
    assert got0[1] is k0 and all(x.data_ptr() != p for x, p in zip(k0, before))  # replaced in the caller's list
    same = [torch.zeros(1, engine.kv_heads, 80, engine.head_dim)] * engine.num_layers
    with pytest.raises(ValueError, match="two lists"):
        blend.blended_forward(engine.model, ids, same, same, ratio=0.15, select_layer=1)
    k2, v2 = blend.chunk_kv(engine.model, ids[:-3], 16, 0)
    with pytest.raises(ValueError, match="layer 0's stored KV has 78 positions; expected 80"):
        blend.blended_forward(engine.model, ids, k2, v2, ratio=0.15, select_layer=1)


def test_blend_keeps_only_the_select_layers_stored_values(engine, monkeypatch):
    """The deviation reads one layer's stored values (``select_layer``'s): the full layers before it drop theirs
    as they are replaced, so at most one stored layer is held beside the blended cache."""
    ids = random_ids(81, seed=7)
    held, update = [], blend._BlendedKV.update

    def spy(self, *a, **kw):
        out = update(self, *a, **kw)
        held.append(sorted(self.stored))
        return out

    monkeypatch.setattr(blend._BlendedKV, "update", spy)
    k, v = blend.chunk_kv(engine.model, ids[:-1], 16, 0, room=1)
    blend.blended_forward(engine.model, ids, k, v, ratio=0.15, select_layer=2)
    assert held == [[], [], [2], []]  # layers 0, 1 kept nothing, 2 its own until the pick, 3 after it


def test_measure_full_runs_before_the_chunk_kv(engine, monkeypatch):
    """With ``measure_full`` the throwaway full prefill runs first (the device then holds no more than the weights),
    and the blend after it is the same as without the measurement."""
    ids = random_ids(81, seed=6)
    order = []
    chunk_kv = blend.chunk_kv
    monkeypatch.setattr(blend, "chunk_kv", lambda *a, **kw: (order.append("chunk_kv"), chunk_kv(*a, **kw))[1])
    hook = engine.model.register_forward_pre_hook(
        lambda m, args, kw: order.append("full") if kw["input_ids"].shape[1] == len(ids) else None, with_kwargs=True)
    try:
        s1, _, costs = blended(engine, ids, chunk_size=16, recompute_ratio=0.15, measure_full=True)
    finally:
        hook.remove()
    assert order == ["full", "chunk_kv"] and "prefill_saved_s" in costs
    s0, _, costs0 = blended(engine, ids, chunk_size=16, recompute_ratio=0.15, measure_full=False)
    assert "prefill_saved_s" not in costs0
    torch.testing.assert_close(s1.last_logits, s0.last_logits, atol=0, rtol=0)
    for a, b in zip(s1.cache.layers, s0.cache.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=0, rtol=0)


def test_blend_through_the_split_equals_the_one_masked_call(engine, monkeypatch):
    """The split form inside a real blended prefill gives the CPU form's cache and logits (small blocks)."""
    from scbench.kernels.dense import attention_lse, prefix_rows_split

    ids = random_ids(81, seed=4)
    knobs = dict(chunk_size=16, recompute_ratio=0.15, select_layer=1, measure_full=False)
    s1, _, _ = blended(engine, ids, **knobs)
    monkeypatch.setattr(blend._ScatteredQueries, "prefill_attention", lambda self, layer, q, k, v, scale:
                        prefix_rows_split(q, k, v, self.idx, scale, part=attention_lse, cells=64))
    s2, _, _ = blended(engine, ids, **knobs)
    torch.testing.assert_close(s2.last_logits, s1.last_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(s1.cache.layers, s2.cache.layers):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=1e-5)


def test_blend_through_row_blocks_equals_the_one_masked_call(engine, monkeypatch):
    """CUDA's form of the recomputed tokens' attention (row blocks, prefix_rows_attention) inside a real blended
    prefill gives the CPU form's cache and logits (tiny budget: one row per block)."""
    from scbench.kernels.dense import prefix_rows_attention

    ids = random_ids(81, seed=4)
    knobs = dict(chunk_size=16, recompute_ratio=0.15, select_layer=1, measure_full=False)
    s1, _, _ = blended(engine, ids, **knobs)
    monkeypatch.setattr(blend._ScatteredQueries, "prefill_attention",
                        lambda self, layer, q, k, v, scale: prefix_rows_attention(q, k, v, self.idx, scale, cells=1))
    s2, _, _ = blended(engine, ids, **knobs)
    torch.testing.assert_close(s2.last_logits, s1.last_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(s1.cache.layers, s2.cache.layers):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,query_visible", [("multi_turn", True), ("multi_turn", False), ("multi_request", True)])
def test_runs_through_the_runner(engine, mode, query_visible):
    task = TASKS.get("scbench_kv")
    from scbench.data import load_examples

    ex = load_examples(task, "generated", n=1, length=300, turns=2, seed=0,
                       count=lambda t: len(engine.encode(t, add_special_tokens=False)))[0]
    spec = RunSpec(model={}, method={"name": "cacheblend"}, task="scbench_kv", mode=mode, max_turns=2, max_new_tokens=4,
                   query_visible=query_visible)  # False: the first query is fed fresh after the blended context
    res = list(Replay(engine, CacheBlend(chunk_size=64), task, ex, spec))
    assert len(res) == 2
    first, second = res[0].stats, res[1].stats
    assert first.method_costs["recompute_frac"] < 0.5 and first.method_costs["chunk_kv_s"] > 0 and first.attn_density < 1
    assert second.method_costs["recompute_frac"] == 1.0 and second.method_costs["chunk_kv_s"] == 0.0  # later feeds are plain prefills
    assert first.prefill_computed == first.prompt_tokens


def test_bad_knobs_and_models(engine):
    for bad in ({"recompute_ratio": 1.5}, {"chunk_size": 0}, {"prefix": 256}, {"select_layer": -1}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
            CacheBlend(**bad)
    s = engine.session(CacheBlend(select_layer=9))
    with pytest.raises(ValueError, match="select_layer 9"):
        s.feed(random_ids(10), compress=True, sparse=True)

    class NotLlama(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="Llama-family"):
        blend.decoder_parts(NotLlama())


@pytest.mark.slow
def test_full_recompute_equals_full_prefill_embedded(embedded_engine):
    """The issue's check on the embedded model: 100% recompute gives the full prefill's logits and greedy tokens."""
    ids = random_ids(120, seed=5)
    s_full = embedded_engine.session(METHODS.get("full")())
    s_full.feed(ids, compress=False, sparse=False)
    logits = s_full.last_logits
    s, _, _ = blended(embedded_engine, ids, chunk_size=32, recompute_ratio=1.0, measure_full=False)
    torch.testing.assert_close(s.last_logits, logits, atol=1e-4, rtol=1e-4)
    assert s.generate(8).tokens == s_full.generate(8).tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batched_chunk_kv_matches_one_forward_per_chunk():
    """On CUDA (2 layers of Llama-3.1-8B's shape, random bf16 weights): the batched chunk KV against one forward per
    chunk, 4,100 tokens (16 chunks of 256 and a short last one, in batches of 2,048 tokens), with a shared prefix.
    bf16 GEMMs of other row counts may round differently: within bf16's tolerance."""
    from support import llama8b_engine

    model = llama8b_engine(2).model
    ids = [t % 1000 for t in random_ids(4100, seed=7)]  # the byte tokenizer's vocabulary: 1,024
    want_k, want_v = blend.chunk_kv_loop(model, ids, 256, 8)
    got_k, got_v = blend.chunk_kv(model, ids, 256, 8, batch_tokens=2048)
    for a, b in zip(got_k + got_v, want_k + want_v):
        assert a.shape == b.shape == (1, 8, 4100, 128)
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 1e-2
