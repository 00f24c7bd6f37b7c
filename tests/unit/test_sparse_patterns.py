"""Sparse prefill patterns on the CPU: masks vs hand-built masks, reference vs chunked path, density, GQA,
bottom-right alignment (Tk > Tq), and the methods' pattern semantics (sinks, local window, dense last rows)."""
import math

import pytest
import torch

from scbench.engines import attention
from scbench.kernels import pattern as pat
from scbench.methods.ashape import AShape
from scbench.methods.trishape import TriShape
from scbench.methods.vertical_slash import VerticalSlash, line_scores

SHAPES = [(37, 37), (23, 61), (1, 9), (64, 64)]  # (Tq, Tk): Tk > Tq is a later chunk on top of a cache


def hand_mask(tq, tk, n_init, n_local, n_last=0):
    m = torch.zeros(tq, tk, dtype=torch.bool)
    for i in range(tq):
        p = i + tk - tq
        for j in range(p + 1):
            m[i, j] = j < n_init or p - j < n_local or i >= tq - n_last
    return m


def qkv(tq, tk, hq=4, hkv=2, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, tq, d, generator=g, dtype=dtype)
    k = torch.randn(1, hkv, tk, d, generator=g, dtype=dtype)
    v = torch.randn(1, hkv, tk, d, generator=g, dtype=dtype)
    return q, k, v


def random_pattern(tq, tk, heads, seed, n_last=0):
    g = torch.Generator().manual_seed(seed)
    cols = torch.rand(heads, tk, generator=g) < 0.2
    diags = torch.rand(heads, tk, generator=g) < 0.3
    diags[:, 0] = True  # every row keeps at least its own key
    return pat.Pattern(tq, tk, cols, diags, n_last=n_last, scattered_cols=True)


@pytest.mark.parametrize("tq,tk", SHAPES)
@pytest.mark.parametrize("n_init,n_local,n_last", [(4, 8, 0), (4, 8, 5), (0, 1, 0), (3, 100, 0), (2, 3, 100)])
def test_band_mask_matches_hand_built(tq, tk, n_init, n_local, n_last):
    p = pat.band(tq, tk, n_init, n_local, n_last)
    assert torch.equal(p.mask()[0], hand_mask(tq, tk, n_init, n_local, n_last))


@pytest.mark.parametrize("tq,tk", SHAPES)
def test_line_mask_matches_hand_built(tq, tk):
    p = random_pattern(tq, tk, heads=3, seed=tq + tk, n_last=2)
    m = p.mask()
    for h in range(3):
        for i in range(tq):
            pos = i + tk - tq
            for j in range(tk):
                want = j <= pos and bool(p.cols[h, j] or p.diags[h, pos - j] or i >= tq - 2)
                assert bool(m[h, i, j]) == want


@pytest.mark.parametrize("tq,tk", SHAPES)
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("n_last", [0, 3])
def test_density_count_is_exact(tq, tk, heads, n_last):
    p = random_pattern(tq, tk, heads, seed=7, n_last=n_last)
    assert p.computed_cells() == int(p.mask().sum())
    full = pat.band(tq, tk, tk, tk)
    assert full.computed_cells() == pat.causal_cells(tq, tk) == int(full.mask().sum())


def test_full_pattern_equals_causal_attention():
    q, k, v = qkv(19, 40)
    p = pat.band(19, 40, 0, 40)
    ref = attention.reference_causal_attention(q, k, v)
    torch.testing.assert_close(pat.reference_attention(q, k, v, p), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pat.chunked_attention(q, k, v, p), ref, atol=1e-5, rtol=1e-5)


def test_reference_matches_per_row_softmax():
    """The reference, checked row by row against a plain softmax over the allowed keys (GQA: head h uses KV h // 2)."""
    q, k, v = qkv(11, 20)
    p = random_pattern(11, 20, heads=4, seed=3)
    out = pat.reference_attention(q, k, v, p, scale=0.3)
    m = p.mask()
    for h in range(4):
        for i in range(11):
            keys = m[h, i].nonzero().squeeze(1)
            w = ((q[0, h, i] @ k[0, h // 2, keys].T) * 0.3).softmax(-1)
            torch.testing.assert_close(out[0, h, i], w @ v[0, h // 2, keys], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tq,tk", SHAPES + [(300, 300), (200, 450)])
@pytest.mark.parametrize("kind", ["band", "tri", "lines", "lines1"])
@pytest.mark.parametrize("fast", [False, True])
def test_chunked_equals_reference(tq, tk, kind, fast):
    """Both forms of the chunked path: per query head, and CUDA's default (dense rows as one causal call, GQA heads
    grouped onto their KV head)."""
    q, k, v = qkv(tq, tk, seed=tq)
    if kind == "band":
        p = pat.band(tq, tk, 5, 17)
    elif kind == "tri":
        p = pat.band(tq, tk, 5, 17, n_last=9)
    else:
        p = random_pattern(tq, tk, heads=4 if kind == "lines" else 1, seed=tk, n_last=0 if kind == "lines" else 4)
    ref = pat.reference_attention(q, k, v, p)
    # a tiny budget forces many chunks and the key restriction
    torch.testing.assert_close(pat.chunked_attention(q, k, v, p, budget=4096, fast=fast), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(pat.chunked_attention(q, k, v, p, fast=fast), ref, atol=2e-5, rtol=2e-5)


def test_methods_validate_knobs():
    with pytest.raises(ValueError):
        AShape(n_local=0)
    with pytest.raises(ValueError):
        TriShape(n_last=-1)
    with pytest.raises(ValueError):
        VerticalSlash(vertical_size=10, init_cols=30)
    assert AShape().describe()["decoding"].startswith("dense")
    assert TriShape().label() == "trishape(n_init=128,n_local=3968,n_last=64)"


def test_ashape_and_trishape_semantics():
    """Sinks and window from A-shape; Tri-shape adds exactly the last rows, causally."""
    q, k, v = qkv(50, 70)
    a = AShape(n_init=3, n_local=6).pattern(0, q, k, None)
    t = TriShape(n_init=3, n_local=6, n_last=4).pattern(0, q, k, None)
    ma, mt = a.mask()[0], t.mask()[0]
    assert torch.equal(ma, hand_mask(50, 70, 3, 6))
    assert torch.equal(mt[:46], ma[:46])
    assert torch.equal(mt[46:], torch.ones(50, 70, dtype=torch.bool).tril(20)[46:])
    out = TriShape(n_init=3, n_local=6, n_last=4).prefill_attention(0, q, k, v, None)
    torch.testing.assert_close(out, pat.reference_attention(q, k, v, t), atol=2e-5, rtol=2e-5)
    # the dense last rows equal full causal attention
    torch.testing.assert_close(out[:, :, 46:], attention.reference_causal_attention(q, k, v)[:, :, 46:],
                               atol=2e-5, rtol=2e-5)


def test_line_scores_match_dense_probabilities():
    q, k, _ = qkv(30, 45)
    vert, slash = line_scores(q[0], k[0], 0.25, last_q=8)
    kk = k[0].repeat_interleave(2, 0)
    s = (q[0, :, -8:] @ kk.transpose(-1, -2)) * 0.25
    pos = torch.arange(37, 45)
    s = s.masked_fill(torch.arange(45)[None] > pos[:, None], float("-inf"))
    a = s.softmax(-1)
    torch.testing.assert_close(vert, a.sum(1), atol=1e-5, rtol=1e-5)
    want = torch.zeros(4, 45)
    for r in range(8):
        for j in range(int(pos[r]) + 1):
            want[:, int(pos[r]) - j] += a[:, r, j]
    torch.testing.assert_close(slash, want, atol=1e-5, rtol=1e-5)


def test_vertical_slash_pattern_and_budgets():
    q, k, v = qkv(60, 90, seed=5)
    m = VerticalSlash(vertical_size=10, slash_size=12, last_q=8, init_cols=2, local_diags=3)
    p = m.pattern(0, q, k, None)
    assert p.heads == 4 and p.scattered_cols
    assert (p.cols.sum(-1) == 10).all() and (p.diags.sum(-1) == 12).all()
    assert p.cols[:, :2].all() and p.diags[:, :3].all()
    # heads get their own lines: the strongest column of head 0's estimate is kept
    vert, _ = line_scores(q[0], k[0], 16**-0.5, 8)
    assert p.cols[0, vert[0].argmax()]
    torch.testing.assert_close(m.prefill_attention(0, q, k, v, None), pat.reference_attention(q, k, v, p),
                               atol=2e-5, rtol=2e-5)
    # budgets covering every line give full causal attention
    big = VerticalSlash(vertical_size=100, slash_size=100, last_q=8)
    torch.testing.assert_close(big.prefill_attention(0, q, k, v, None),
                               attention.reference_causal_attention(q, k, v), atol=2e-5, rtol=2e-5)


def test_density_reported_through_attention_context():
    q, k, v = qkv(40, 40)
    ctx = attention.AttnContext(method=AShape(n_init=2, n_local=5), sparse=True)
    with attention.active(ctx):
        attention.scbench_attention(None, q, k, v, None, scaling=None)
    p = pat.band(40, 40, 2, 5)
    assert ctx.cells_total == 4 * pat.causal_cells(40, 40)
    assert ctx.cells_computed == 4 * int(p.mask().sum())
    dense = attention.AttnContext(method=AShape(), sparse=False)
    with attention.active(dense):
        attention.scbench_attention(None, q, k, v, None, scaling=None)
    assert dense.cells_computed == dense.cells_total == 4 * 40 * 41 // 2
    # per head: window rows 1+2+3+4 + 36*5 = 190, sink columns outside the window 35 + 34
    assert math.isclose(ctx.cells_computed / ctx.cells_total, (190 + 35 + 34) / 820)


def _block_lists(num, idx, p_heads, nq, nk):
    m = torch.zeros(p_heads, nq, nk, dtype=torch.bool)
    for h in range(p_heads):
        for i in range(nq):
            m[h, i, idx[0, h, i, : num[0, h, i]].long()] = True
    return m


@pytest.mark.parametrize("tq,tk", [(256, 256), (300, 300), (200, 517), (1, 130), (129, 129)])
@pytest.mark.parametrize("kind", ["band", "tri", "lines", "full"])
def test_block_mask_lists_cover_the_pattern(tq, tk, kind):
    """The GPU path's block lists (built on CPU here): every allowed cell lies in a listed block, full blocks
    hold only allowed cells, and no listed block is empty."""
    from scbench.kernels import flex

    if kind == "band":
        p = pat.band(tq, tk, 16, 200)
    elif kind == "tri":
        p = pat.band(tq, tk, 130, 100, n_last=40)
    elif kind == "full":
        p = pat.band(tq, tk, 0, tk)
    else:
        p = random_pattern(tq, tk, heads=3, seed=1, n_last=7)
        p.cols.zero_()
    bm = flex.block_mask(p)
    p = pat.Pattern(p.tq, p.tk, p.cols, p.diags)  # the block mask covers the sparse rows; dense rows run apart
    b = flex.BLOCK
    nq, nk = -(-tq // b), -(-tk // b)
    partial = _block_lists(bm.kv_num_blocks, bm.kv_indices, p.heads, nq, nk)
    full = _block_lists(bm.full_kv_num_blocks, bm.full_kv_indices, p.heads, nq, nk)
    assert not (partial & full).any()
    m = p.mask()
    cells = torch.nn.functional.pad(m, (0, nk * b - tk, 0, nq * b - tq)).view(p.heads, nq, b, nk, b)
    any_cell = cells.any(4).any(2)
    assert torch.equal(any_cell, partial | full)  # exact: no allowed cell missed, no empty block visited
    valid = torch.nn.functional.pad(torch.ones(tq, tk, dtype=torch.bool), (0, nk * b - tk, 0, nq * b - tq))
    all_cell = (cells | ~valid.view(1, nq, b, nk, b)).all(4).all(2)
    assert not (full & ~all_cell).any()
    if kind == "full" and tq % b == 0 and tk % b == 0:
        assert torch.equal(full, all_cell & any_cell)  # interior causal blocks skip the mask_mod


@pytest.mark.parametrize("tq,tk", [(300, 300), (200, 517), (256, 1024)])
def test_gathered_column_block_lists(tq, tk, monkeypatch):
    """Vertical-slash's second FlexAttention call (gathered columns): its block lists cover every column cell
    not on a chosen diagonal, its full blocks hold only such cells, and its cell test is exactly those cells
    (padding slots never; checked on CPU, no kernel run)."""
    from scbench.kernels import flex

    g = torch.Generator().manual_seed(tk)
    cols = torch.rand(4, tk, generator=g) < 0.5
    diags = torch.rand(4, tk, generator=g) < 0.1
    diags[:, 100:] = False  # chosen diagonals near the main one, as real heads pick them
    diags[:, :3] = True
    p = pat.Pattern(tq, tk, cols, diags, scattered_cols=True)
    seen = {}
    monkeypatch.setattr(flex, "_flex_lse", lambda q, k, v, bm, scale, gqa: seen.setdefault("bm", bm))
    q, k, v = qkv(tq, tk)
    flex._gathered_cols(q, k, v, p, None)
    bm = seen["bm"]
    b, n = flex.BLOCK, int(cols.sum(-1).max())
    nq, nk = -(-tq // b), -(-n // b)
    partial = _block_lists(bm.kv_num_blocks, bm.kv_indices, 4, nq, nk)
    full = _block_lists(bm.full_kv_num_blocks, bm.full_kv_indices, 4, nq, nk)
    want = torch.zeros(4, nq * b, nk * b, dtype=torch.bool)
    valid = torch.zeros(4, nq * b, nk * b, dtype=torch.bool)
    for h in range(4):
        pos = cols[h].nonzero().squeeze(1)
        d = (torch.arange(tq)[:, None] + tk - tq) - pos[None, :]
        want[h, :tq, : len(pos)] = (d >= 0) & ~diags[h, d.clamp(min=0)]
        valid[h, :tq, : len(pos)] = True
    cells, vb = want.view(4, nq, b, nk, b), valid.view(4, nq, b, nk, b)
    listed = partial | full
    assert not (cells.any(4).any(2) & ~listed).any()  # no computed cell outside the lists
    assert not (listed & ~vb.any(4).any(2)).any()  # no padding-only block visited
    assert not (full & ~(cells | ~vb).all(4).all(2)).any()  # full blocks hold only computed cells
    assert not (full & ~vb.all(4).all(2)).any()
    qi = torch.arange(nq * b, dtype=torch.int32)[:, None].clamp(max=tq - 1)
    ki = torch.arange(nk * b, dtype=torch.int32)[None, :]
    for h in range(4):
        got = bm.mask_mod(torch.tensor(0, dtype=torch.int32), torch.tensor(h, dtype=torch.int32), qi, ki)
        assert torch.equal(got[:tq], want[h, :tq]), h
    if tk >= 4 * tq:
        assert full.any()  # blocks far below the chosen diagonals skip the mask_mod


@pytest.mark.parametrize("heads,tq,tk", [(3, 200, 517), (1, 300, 300), (3, 40, 1000)])
@pytest.mark.parametrize("part", ["whole", "diagonals"])
def test_mask_mod_equals_pattern_cells(heads, tq, tk, part):
    """The main FlexAttention call's cell test, evaluated on every cell with int32 indices as FlexAttention passes
    them (a diagonals-only pattern skips its zero columns), equals the pattern's mask."""
    from scbench.kernels import flex

    p = random_pattern(tq, tk, heads=heads, seed=tk)
    if part == "diagonals":
        p = p.diagonals_only()
        assert p.no_cols
    mm = flex._mask_mod(p)
    q = torch.arange(tq, dtype=torch.int32)[:, None]
    kv = torch.arange(tk, dtype=torch.int32)[None, :]
    want = p.mask()
    for h in range(heads):
        got = mm(torch.tensor(0, dtype=torch.int32), torch.tensor(h, dtype=torch.int32), q, kv)
        assert torch.equal(got, want[h]), h


def test_cell_tests_keep_int32_arithmetic(monkeypatch):
    """FlexAttention passes int32 indices: every tensor constant or position table the cell tests capture is int32
    (an int64 one widens each cell's arithmetic: +5 ms of 42 in the diagonal call at 131K on the H200,
    results/perf/vs_prefill_h200.md)."""
    from scbench.kernels import flex

    def captured(fn):
        return [c.cell_contents for c in fn.__closure__ or () if isinstance(c.cell_contents, torch.Tensor)
                and c.cell_contents.dtype != torch.bool]

    p = random_pattern(200, 517, heads=4, seed=0)
    for q in (p, p.diagonals_only(), pat.band(200, 517, 4, 30)):
        got = captured(flex._mask_mod(q))
        assert got and all(t.dtype == torch.int32 for t in got), [t.dtype for t in got]
    seen = {}
    monkeypatch.setattr(flex, "_flex_lse", lambda q, k, v, bm, scale, gqa: seen.setdefault("bm", bm))
    q, k, v = qkv(200, 517)
    flex._gathered_cols(q, k, v, pat.Pattern(p.tq, p.tk, p.cols, p.diags, scattered_cols=True), None)
    got = captured(seen["bm"].mask_mod)
    assert len(got) >= 4 and all(t.dtype == torch.int32 for t in got), [t.dtype for t in got]


@pytest.mark.parametrize("tq,tk", [(64, 64), (64, 1000), (37, 300), (5, 128)])
def test_dense_rows_block_mask_is_bottom_right_causal(tq, tk):
    """The decoding-kernel mask of the dense last rows: listed blocks are exactly those with a causal cell,
    full blocks hold only causal cells."""
    from scbench.kernels import flex

    bm = flex.rows_block_mask(tq, tk, torch.device("cpu"))
    b = flex.BLOCK
    nk = -(-tk // b)
    partial = _block_lists(bm.kv_num_blocks, bm.kv_indices, 1, 1, nk)[0, 0]
    full = _block_lists(bm.full_kv_num_blocks, bm.full_kv_indices, 1, 1, nk)[0, 0]
    causal = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    cells = torch.nn.functional.pad(causal, (0, nk * b - tk)).view(tq, nk, b)
    assert not (partial & full).any()
    assert torch.equal(partial | full, cells.any(2).any(0))
    valid = torch.nn.functional.pad(torch.ones(tq, tk, dtype=torch.bool), (0, nk * b - tk)).view(tq, nk, b)
    assert not (full & ~(cells | ~valid).all(2).all(0)).any()
    q = torch.arange(tq)[:, None]
    kv = torch.arange(tk)[None, :]
    assert torch.equal(bm.mask_mod(0, 0, q, kv), causal)


def test_vertical_slash_head_patterns(tmp_path):
    """A searched per-head file: its A-shape heads get the band lines, the others the estimated lines."""
    import json

    f = tmp_path / "heads.json"
    f.write_text(json.dumps({"layers": [["ashape", "vertical_slash", "vertical_slash", "ashape"]],
                             "ashape": {"n_init": 2, "n_local": 5}}))
    q, k, _ = qkv(40, 40)
    kw = dict(vertical_size=4, slash_size=6, last_q=8, init_cols=1, local_diags=2)
    plain = VerticalSlash(**kw).pattern(0, q, k, None).mask()
    m = VerticalSlash(**kw, head_patterns=str(f))
    got = m.pattern(0, q, k, None).mask()
    band = hand_mask(40, 40, 2, 5)
    for h in (0, 3):
        assert torch.equal(got[h], band)
    for h in (1, 2):
        assert torch.equal(got[h], plain[h])
    assert len(m.describe()["head_patterns_sha256"]) == 64
    with pytest.raises(ValueError, match="layer 1"):
        m.pattern(1, q, k, None)
    with pytest.raises(ValueError, match="4 heads for layer 0; the model has 8 query heads"):
        m.pattern(0, torch.cat([q, q], 1), torch.cat([k, k], 1), None)


@pytest.mark.parametrize("content,match", [
    (None, "no file"),
    ("{not json", "not JSON"),
    ('{"layers": [["ashape", "blocky"]], "ashape": {"n_init": 1, "n_local": 4}}', "blocky"),
    ('{"layers": [], "ashape": {"n_init": 1, "n_local": 4}}', "layers"),
    ('{"layers": [["ashape"]], "ashape": {"n_init": 1}}', "n_local"),
])
def test_vertical_slash_head_patterns_bad_file(tmp_path, content, match):
    f = tmp_path / "heads.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        VerticalSlash(head_patterns=str(f))
    assert str(f) in str(e.value)


def test_prefix_sums_are_computed_once_and_shared_by_the_diagonals_only_part():
    g = torch.Generator().manual_seed(0)
    p = pat.Pattern(50, 80, torch.rand(3, 80, generator=g) < 0.2, torch.rand(3, 80, generator=g) < 0.3)
    for name in ("cols", "diags"):
        lines = getattr(p, name)
        assert torch.equal(p.prefix(name), torch.nn.functional.pad(lines.cumsum(-1), (1, 0)).int())
        assert p.prefix(name) is p.prefix(name)
    main = p.diagonals_only()
    assert not main.cols.any() and main.diags is p.diags and not main.scattered_cols
    assert main.prefix("diags") is p.prefix("diags")
    assert main.prefix("cols").shape == (3, 81) and not main.prefix("cols").any()


@pytest.mark.parametrize("hkv", [4, 1])
@pytest.mark.parametrize("kind", ["tri", "lines"])
def test_a_short_chunk_over_a_long_past_in_the_fast_form(hkv, kind):
    """The shape the GPU sends to the chunked path: a few query rows after many keys (a first turn's query fed after
    its context), every row dense (Tri-shape's n_last covers the chunk) or per-head lines; with and without GQA."""
    q, k, v = qkv(12, 700, hq=4, hkv=hkv, seed=5)
    p = pat.band(12, 700, 5, 17, n_last=64) if kind == "tri" else random_pattern(12, 700, heads=4, seed=9)
    ref = pat.reference_attention(q, k, v, p)
    for fast in (False, True):
        torch.testing.assert_close(pat.chunked_attention(q, k, v, p, fast=fast), ref, atol=2e-5, rtol=2e-5)
