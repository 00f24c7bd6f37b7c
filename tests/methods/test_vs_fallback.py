"""Vertical-slash on a GPU falls back to dense SDPA for a layer whose estimated pattern is too dense for
FlexAttention to win, and records it (CUDA only: the CPU path always runs the chunked reference)."""
import pytest
import torch

from scbench.engines import attention
from scbench.methods.vertical_slash import VerticalSlash


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dense_estimate_falls_back_and_structured_does_not():
    torch.manual_seed(0)
    n, d = 8192, 128
    q = torch.randn(1, 8, n, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    m = VerticalSlash(vertical_size=64, slash_size=512, local_diags=64)
    ctx = attention.AttnContext()
    with attention.active(ctx):
        out = m.prefill_attention(0, q, k, v, d**-0.5)  # random q, k: no structure, lines spread everywhere
    assert m.take_costs(None) == {"prefill_fallbacks": 1}
    torch.testing.assert_close(out, attention.causal_attention(q, k, v, d**-0.5))
    local = VerticalSlash(vertical_size=64, slash_size=512, local_diags=512)  # the nearest diagonals only
    with attention.active(attention.AttnContext()):
        local.prefill_attention(0, q, k, v, d**-0.5)
    assert local.take_costs(None) == {"prefill_fallbacks": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fallback_layers_still_compile_the_sparse_calls_for_two_lengths(monkeypatch):
    """A warm-up whose layers all fall back still runs (and so compiles) the FlexAttention calls at its first two
    prompt lengths; the output stays the dense one; later lengths fall back without them."""
    from scbench.kernels import flex
    from scbench.methods import vertical_slash

    monkeypatch.setattr(vertical_slash, "DENSE_ABOVE", -1.0)  # every layer falls back
    monkeypatch.setattr(vertical_slash, "SPARSE_LENGTHS", set())
    calls = []
    real = flex.attention
    monkeypatch.setattr(flex, "attention", lambda *a, **kw: calls.append(a[3].tq) or real(*a, **kw))
    m = VerticalSlash(vertical_size=64, slash_size=512, local_diags=64)
    for n in (4608, 5376, 6000):
        q = torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 2, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        with attention.active(attention.AttnContext()):
            out = m.prefill_attention(0, q, k, v, 0.125)
        torch.testing.assert_close(out, attention.causal_attention(q, k, v, 0.125))
    assert calls == [4608, 5376] and vertical_slash.SPARSE_LENGTHS == {4608, 5376}
    assert m.take_costs(None) == {"prefill_fallbacks": 3}
