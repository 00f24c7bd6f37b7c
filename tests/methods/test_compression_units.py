"""KV-compression building blocks on random tensors, each fast path against a plain reference written here."""
import math

import pytest
import torch

from scbench.kv import quant
from scbench.methods.h2o import H2O, accumulated_attention
from scbench.methods.kivi import KIVI
from scbench.methods.pyramidkv import PyramidKV, layer_budgets
from scbench.methods.token_scores import gather, resolve_budget, select
from scbench.methods.snapkv import SnapKV


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- plain references ----------------------------------------------------------------------------
def ref_attention_rows(keys, queries):
    """float64 causal softmax of the last w positions, per query head (GQA by h // group): [B, Hq, w, n]."""
    b, h, n, d = keys.shape
    hq, w = queries.shape[1], queries.shape[2]
    out = torch.zeros(b, hq, w, n, dtype=torch.float64)
    for bi in range(b):
        for qh in range(hq):
            k = keys[bi, qh // (hq // h)].double()
            for i in range(w):
                pos = n - w + i
                logits = (k[: pos + 1] @ queries[bi, qh, i].double()) / math.sqrt(d)
                out[bi, qh, i, : pos + 1] = torch.softmax(logits, 0)
    return out


def ref_snapkv_scores(keys, queries, kernel):
    b, h, n, _ = keys.shape
    hq, w = queries.shape[1], queries.shape[2]
    att = ref_attention_rows(keys, queries)[..., : n - w].mean(2)  # [B, Hq, n - w]
    pad = kernel // 2
    pooled = torch.zeros_like(att)
    for j in range(n - w):
        lo, hi = max(0, j - pad), min(n - w, j + pad + 1)
        pooled[..., j] = att[..., lo:hi].sum(-1) / kernel  # zero padding counted
    return pooled.view(b, h, hq // h, n - w).mean(2)


def ref_h2o_scores(keys, queries):
    b, h, n, _ = keys.shape
    hq = queries.shape[1]
    return ref_attention_rows(keys, queries).sum(2).view(b, h, hq // h, n).sum(2)


def ref_select(scores, k, recent):
    b, h, n = scores.shape
    out = torch.zeros(b, h, k, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            cand = sorted(range(n - recent), key=lambda j: -float(scores[bi, hi, j]))[: k - recent]
            out[bi, hi] = torch.tensor(sorted(cand) + list(range(n - recent, n)))
    return out


def ref_quantize(x, bits, group, axis):
    """Loop over groups: returns integers [B, H, T, D] and per-group (scale, zero) as floats."""
    levels = 2**bits - 1
    b, h, t, d = x.shape
    q = torch.zeros(b, h, t, d, dtype=torch.long)
    shape = (b, h, t // group, d) if axis == -2 else (b, h, t, d // group)
    scale, zero = torch.zeros(shape), torch.zeros(shape)
    for i in range(shape[2]):
        for j in range(shape[3]):
            sl = (slice(None), slice(None), slice(i * group, (i + 1) * group), slice(j, j + 1)) if axis == -2 else (
                slice(None), slice(None), slice(i, i + 1), slice(j * group, (j + 1) * group))
            g = x[sl]
            lo = g.amin(dim=(2, 3))
            sc = (g.amax(dim=(2, 3)) - lo) / levels
            scale[:, :, i, j], zero[:, :, i, j] = sc, lo
            safe = torch.where(sc > 0, sc, torch.ones_like(sc))
            q[sl] = ((g - lo[..., None, None]) / safe[..., None, None]).round().clamp(0, levels).long()
    return q, scale, zero


def ref_pack(q, bits):
    per = 8 // bits
    flat = q.reshape(-1, q.shape[-1]).tolist()
    rows = [[sum(int(row[i * per + j]) << (j * bits) for j in range(per)) for i in range(len(row) // per)] for row in flat]
    return torch.tensor(rows, dtype=torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // per)


# --- scoring and selection -----------------------------------------------------------------------
@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 3), (2, 2)])
def test_snapkv_scores_match_reference(hq, hkv):
    keys, queries = rand(1, hkv, 40, 8), rand(1, hq, 6, 8, seed=1)
    fast = SnapKV(budget=10, window=6).score(0, keys, keys, queries)
    torch.testing.assert_close(fast[..., :-6].double(), ref_snapkv_scores(keys, queries, 5), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_elems", [1, 300, 1 << 24])
def test_h2o_accumulated_attention_chunks_match_reference(chunk_elems):
    keys, queries = rand(2, 2, 30, 8), rand(2, 4, 30, 8, seed=1)  # every prompt query
    fast = accumulated_attention(keys, queries, chunk_elems=chunk_elems)
    torch.testing.assert_close(fast.double(), ref_h2o_scores(keys, queries), rtol=1e-5, atol=1e-6)
    part = accumulated_attention(keys, queries[:, :, -7:], chunk_elems=chunk_elems)  # obs_window = 7
    torch.testing.assert_close(part.double(), ref_h2o_scores(keys, queries[:, :, -7:]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,recent", [(5, 0), (8, 3), (4, 4), (12, 12)])
def test_select_and_gather_match_reference(k, recent):
    scores = rand(2, 3, 12)
    idx = select(scores, k, recent)
    assert torch.equal(idx, ref_select(scores, k, recent))
    x = rand(2, 3, 12, 4, seed=2)
    kept = gather(x, idx)
    for b in range(2):
        for h in range(3):
            assert torch.equal(kept[b, h], x[b, h, idx[b, h]])


def test_compress_cache_keeps_window_and_is_really_smaller():
    keys, values, queries = rand(1, 2, 100, 8), rand(1, 2, 100, 8, seed=1), rand(1, 4, 32, 8, seed=2)
    m = SnapKV(budget=40, window=32)
    idx = m.keep_indices(0, keys, values, queries)
    k, v = m.compress_cache(0, keys, values, queries)
    assert k.shape == v.shape == (1, 2, 40, 8) and k.is_contiguous() and k.untyped_storage().nbytes() == k.numel() * 4
    assert torch.equal(idx[..., -32:], torch.arange(68, 100).expand(1, 2, 32))
    ref = ref_select(ref_snapkv_scores(keys, queries, 5).float(), 8, 0)
    assert torch.equal(idx[..., :8], ref)


def test_h2o_splits_heavy_and_recent():
    keys, queries = rand(1, 2, 64, 8), rand(1, 4, 64, 8, seed=1)
    idx = H2O(budget=20, recent_ratio=0.25).keep_indices(0, keys, keys, queries)
    assert torch.equal(idx[..., -5:], torch.arange(59, 64).expand(1, 2, 5))
    assert torch.equal(idx[..., :15], ref_select(ref_h2o_scores(keys, queries)[..., :59].float(), 15, 0))


def test_budgets_count_ratio_and_pyramid():
    assert resolve_budget(64, 1000) == 64 and resolve_budget(1 / 32, 4096) == 128 and resolve_budget(0.001, 10) == 1
    m = SnapKV(budget=0.25)
    m.begin_compression(num_layers=2, seen_tokens=400)  # ratio of the tokens seen, not of the cache
    assert m.capacity(0, 150) == 100
    budgets = layer_budgets(256, 2000, 32, 30, 20)
    assert budgets[0] == 32 + 2 * 224 - 224 // 20 and budgets == sorted(budgets, reverse=True)
    assert budgets[-1] == 32 + 224 // 20 and abs(sum(budgets) - 30 * 256) <= 15  # same total, up to rounding
    assert layer_budgets(256, 300, 32, 4, 20) == [256] * 4  # prompt shorter than 2p: no pyramid (reference rule)
    assert layer_budgets(256, 460, 32, 4, 20)[0] == 460 - 0  # bottom layer clamped to the prompt: keeps all
    assert layer_budgets(400, 300, 32, 4, 20) == [300] * 4
    p = PyramidKV(budget=256)
    with pytest.raises(RuntimeError):
        p.capacity(0, 1000)


@pytest.mark.parametrize("cls,kw", [
    (SnapKV, dict(budget=0)), (SnapKV, dict(budget=1.5)), (SnapKV, dict(budget=True)), (SnapKV, dict(kernel=4)),
    (SnapKV, dict(window=0)), (PyramidKV, dict(beta=0)), (H2O, dict(recent_ratio=2.0)), (H2O, dict(obs_window=0)),
    (KIVI, dict(bits=3)), (KIVI, dict(group=0)), (KIVI, dict(residual=-1)),
])
def test_bad_knobs_raise(cls, kw):
    with pytest.raises(ValueError):
        cls(**kw)


# --- KIVI quantization ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_match_reference(bits):
    q = torch.randint(0, 2**bits, (2, 3, 5, 16), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    packed = quant.pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 16 * bits // 8)
    assert torch.equal(packed, ref_pack(q, bits))
    assert torch.equal(quant.unpack(packed, bits), q)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis", [-2, -1])
def test_quantize_matches_reference_and_error_bound(bits, axis):
    x = rand(1, 2, 64, 64) * 3
    packed, scale, zero = quant.quantize(x, bits, 32, axis)
    q, rscale, rzero = ref_quantize(x, bits, 32, axis)
    torch.testing.assert_close(scale, rscale)
    torch.testing.assert_close(zero, rzero)
    assert (quant.unpack(packed, bits).long() - q).abs().max() <= 1  # ties of round() may differ by float noise
    assert (quant.unpack(packed, bits).long() != q).float().mean() < 1e-3
    back = quant.dequantize(packed, scale, zero, bits, 32, axis, torch.float32)
    bound = (rscale.repeat_interleave(32, dim=-2) if axis == -2 else rscale.repeat_interleave(32, dim=-1)) / 2
    assert ((back - x).abs() <= bound * 1.0001 + 1e-6).all()
    assert packed.numel() == x.numel() * bits // 8  # really packed


def test_quantize_constant_group_is_exact():
    x = torch.full((1, 1, 32, 32), 0.75)
    back = quant.dequantize(*quant.quantize(x, 2, 32, -2), 2, 32, -2, torch.float32)
    assert torch.equal(back, x)


def kivi_bytes(n, h, d, bits, group, residual, elt=4):
    """Independent analytic size: packed ints + per-group scale and zero + exact residual."""
    nq = max(0, (n - residual) // group) * group
    gv = min(group, d)
    return h * (2 * nq * d * bits / 8 + 2 * (nq // group) * d * elt + 2 * nq * (d // gv) * elt + 2 * (n - nq) * d * elt)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_layer_appends_requantizes_crops_and_snapshots(bits):
    h, d, g, r = 2, 32, 32, 32
    keys, values = rand(1, h, 100, d), rand(1, h, 100, d, seed=1)
    layer = quant.KIVILayer(keys[..., :70, :], values[..., :70, :], bits=bits, group=g, residual=r)
    assert layer.n_quant == 32 and layer.keys.shape[-2] == 38
    for t in range(70, 100):  # one token at a time, as decoding does
        k_all, v_all = layer.update(keys[..., t : t + 1, :], values[..., t : t + 1, :])
        assert k_all.shape[-2] == t + 1 and torch.equal(k_all[..., -1, :], keys[..., t, :])
        assert r <= layer.keys.shape[-2] < r + g
        assert layer.scbench_nbytes() == kivi_bytes(t + 1, h, d, bits, g, r) == quant.analytic_nbytes(
            t + 1, batch=1, heads=h, head_dim=d, bits=bits, group=g, residual=r, elt=4)
    assert layer.n_quant == 64
    k_all, v_all = layer.dequantized()
    torch.testing.assert_close(k_all[..., 64:, :], keys[..., 64:, :], rtol=0, atol=0)  # residual exact
    err = (k_all[..., :64, :] - keys[..., :64, :]).abs().max()
    assert err <= (keys.amax() - keys.amin()) / (2**bits - 1) / 2 * 1.001
    snap = layer.scbench_snapshot()
    layer.scbench_crop(40)  # into a quantized group: that group's kept tokens return dequantized
    assert layer.get_seq_length() == 40 and layer.n_quant == 32
    torch.testing.assert_close(layer.dequantized()[0], k_all[..., :40, :], rtol=0, atol=0)
    layer.scbench_restore(snap)
    assert layer.get_seq_length() == 100 and torch.equal(layer.dequantized()[1], v_all)
    layer.crop(-10)
    assert layer.get_seq_length() == 90 and layer.n_quant == 64
