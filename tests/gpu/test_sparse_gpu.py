"""FlexAttention paths of the sparse prefill patterns vs the float64 reference (bf16 tolerance). Needs CUDA."""
import pytest
import torch

from scbench.kernels import pattern as pat
from scbench.methods.ashape import AShape
from scbench.methods.trishape import TriShape
from scbench.methods.vertical_slash import VerticalSlash

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def sparse_kernel_always(monkeypatch):
    """These tests check the FlexAttention kernel against the reference: keep vertical-slash on it even where its
    dense fallback (a block density above DENSE_ABOVE, tests/methods/test_vs_fallback.py) would take over."""
    from scbench.methods import vertical_slash

    monkeypatch.setattr(vertical_slash, "DENSE_ABOVE", 1.01)


# (Tq, Tk): block-aligned, ragged, and a later chunk on top of a cache (Tk > Tq)
SHAPES = [(1024, 1024), (1000, 1000), (700, 1900), (2300, 2300)]


def qkv(tq, tk, hq=8, hkv=2, d=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, hq, tq, d, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, tk, d, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, tk, d, generator=g, device="cuda", dtype=torch.bfloat16)
    return q, k, v


def assert_flex_matches(method, tq, tk, seed=0):
    q, k, v = qkv(tq, tk, seed=seed)
    with torch.inference_mode():
        out = method.prefill_attention(0, q, k, v, None)
        ref = pat.reference_attention(q, k, v, method.pattern(0, q, k, None))
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("tq,tk", SHAPES)
def test_ashape_flex_matches_reference(tq, tk):
    assert_flex_matches(AShape(n_init=64, n_local=300), tq, tk)


@pytest.mark.parametrize("tq,tk", SHAPES)
def test_trishape_flex_matches_reference(tq, tk):
    assert_flex_matches(TriShape(n_init=64, n_local=300, n_last=100), tq, tk)


@pytest.mark.parametrize("tq,tk", SHAPES)
def test_vertical_slash_flex_matches_reference(tq, tk):
    assert_flex_matches(VerticalSlash(vertical_size=100, slash_size=200, last_q=64), tq, tk, seed=tq)


def test_random_line_pattern_flex_matches_reference():
    """Scattered diagonals and columns on every head, dense last rows: the general block-mask builder."""
    from scbench.kernels import flex

    tq, tk = 900, 1500
    q, k, v = qkv(tq, tk, seed=3)
    g = torch.Generator(device="cuda").manual_seed(1)
    cols = torch.rand(8, tk, generator=g, device="cuda") < 0.05
    diags = torch.rand(8, tk, generator=g, device="cuda") < 0.05
    diags[:, 0] = True
    for scattered in (False, True):
        p = pat.Pattern(tq, tk, cols, diags, n_last=30, scattered_cols=scattered)
        with torch.inference_mode():
            out = flex.attention(q, k, v, p, 0.1)
            ref = pat.reference_attention(q, k, v, p, 0.1)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_tiny_llama_forward_through_scbench_attention():
    """A random tiny Llama in bf16 on the GPU through the registered attention function: covering windows give
    the dense logits (FlexAttention path, Tq >= 128), a small window computes fewer cells."""
    from scbench.engines import attention
    from support import random_llama

    attention.register()
    model = random_llama(1000, hidden=256, intermediate=512).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation(attention.NAME)
    ids = torch.randint(0, 1000, (1, 700), device="cuda")

    def run(method, sparse):
        ctx = attention.AttnContext(method=method, sparse=sparse)
        with torch.inference_mode(), attention.active(ctx):
            return model(input_ids=ids).logits.float(), ctx

    full, _ = run(AShape(), False)
    for m in (AShape(n_init=4, n_local=1024), TriShape(n_init=4, n_local=1024, n_last=64),
              VerticalSlash(vertical_size=1024, slash_size=1024, last_q=64)):
        out, ctx = run(m, True)
        assert ctx.cells_computed == ctx.cells_total
        torch.testing.assert_close(out, full, atol=3e-2, rtol=3e-2)
    out, ctx = run(AShape(n_init=4, n_local=64), True)
    assert ctx.cells_computed < 0.2 * ctx.cells_total
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("n_last", [64, 100])
def test_trishape_dense_rows_split_over_key_segments(n_last, monkeypatch):
    """Dense last rows (< 128) split the keys into segments merged by log-sum-exp (small segments here)."""
    from scbench.kernels import flex

    monkeypatch.setattr(flex, "SPLIT_SEGMENT", 256)
    for tq, tk in ((1000, 1000), (700, 1900)):
        assert_flex_matches(TriShape(n_init=64, n_local=300, n_last=n_last), tq, tk)


def test_split_rows_llama_shape():
    """The default segment on Llama-3.1-8B head shapes (32 q / 8 kv heads, d=128), 64 rows over 20,000 keys."""
    from scbench.kernels import flex

    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(1, 32, 64, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 20000, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, 20000, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        out = flex.split_rows(q, k, v, None)
        mask = torch.ones(64, 20000, dtype=torch.bool, device="cuda").tril(20000 - 64)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                               enable_gqa=True)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("options", [{}, {"USE_TMA": True, "PRESCALE_QK": True}])
def test_kernel_options_keep_agreement(options, monkeypatch):
    """Every sparse path without kernel options and under the other set the probe measured."""
    from scbench.kernels import flex

    monkeypatch.setattr(flex, "KERNEL_OPTIONS", options)
    for m in (AShape(n_init=64, n_local=300), TriShape(n_init=64, n_local=300, n_last=100),
              VerticalSlash(vertical_size=100, slash_size=200, last_q=64)):
        assert_flex_matches(m, 1000, 1000, seed=5)


@pytest.mark.parametrize("tq,tk", SHAPES)
def test_duo_split_prefill_matches_reference(tq, tk, tmp_path):
    """DuoAttention's prefill split by head kind (SDPA for the retrieval heads, the FlexAttention band for the
    streaming ones) against the float reference of its per-head pattern table."""
    import json

    from scbench.methods.duo_attention import DuoAttention

    path = tmp_path / "gates.json"
    path.write_text(json.dumps({"gates": [[0.9, 0.1]]}))
    assert_flex_matches(DuoAttention(heads=str(path), n_init=64, n_local=300), tq, tk, seed=tq)


@pytest.mark.parametrize("method", [TriShape(n_init=4, n_local=64), VerticalSlash(vertical_size=40, slash_size=120, init_cols=4, local_diags=16),
                                    AShape(n_init=4, n_local=64)], ids=["trishape", "vertical_slash", "ashape"])
def test_a_short_chunk_over_a_long_past_matches_reference(method):
    """A first turn's query fed after its context (policy.query_visible=false): fewer rows than FlexAttention takes,
    so the chunked path's fast form (dense rows as one causal call, GQA heads grouped), against the reference and
    the per-head form."""
    from scbench.methods.sparse_prefill import MIN_FLEX_QUERIES

    q, k, v = qkv(50, 6000 + 50, seed=3)
    assert 50 < MIN_FLEX_QUERIES
    with torch.inference_mode():
        out = method.prefill_attention(0, q, k, v, None)
        p = method.pattern(0, q, k, q.shape[-1] ** -0.5)
        ref = pat.reference_attention(q, k, v, p)
        slow = pat.chunked_attention(q, k, v, p, fast=False)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), slow.float(), atol=2e-2, rtol=2e-2)
