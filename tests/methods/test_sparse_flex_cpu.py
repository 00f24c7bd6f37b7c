"""The GPU path's logic on the CPU: scbench.kernels.flex with FlexAttention run eagerly (no kernel; the
compiled kernel on CPU cannot return log-sum-exps). Checks block lists + mask_mod + the split and merge steps
(gathered columns, dense last rows over key segments) against the float64 reference. The kernels themselves
are checked on a GPU in tests/test_sparse_gpu.py."""
import pytest
import torch

from scbench.kernels import flex
from scbench.kernels import pattern as pat

pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture(autouse=True)
def eager_flex(monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex, "compiled_flex", lambda: flex_attention)
    monkeypatch.setattr(flex, "_compiled", lambda fn: fn)


def qkv(tq, tk, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, tq, d, generator=g), torch.randn(1, hkv, tk, d, generator=g),
            torch.randn(1, hkv, tk, d, generator=g))


@pytest.mark.parametrize("tq,tk,segment", [(37, 1000, 256), (64, 64, 128), (20, 300, 100), (100, 700, 128)])
def test_split_rows_equals_causal_rows(tq, tk, segment):
    q, k, v = qkv(tq, tk, seed=tk)
    out = flex.split_rows(q, k, v, 0.3, segment)
    ref = pat.reference_attention(q, k, v, pat.band(tq, tk, 0, tk), 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tq,tk", [(300, 300), (200, 517)])
@pytest.mark.parametrize("kind", ["band", "tri", "lines", "lines1"])
def test_flex_attention_logic_matches_reference(tq, tk, kind, monkeypatch):
    monkeypatch.setattr(flex, "SPLIT_SEGMENT", 64)  # dense rows take the segment split at these sizes
    q, k, v = qkv(tq, tk, seed=tq)
    if kind == "band":
        p = pat.band(tq, tk, 16, 50)
    elif kind == "tri":
        p = pat.band(tq, tk, 16, 50, n_last=30)
    else:
        g = torch.Generator().manual_seed(2)
        heads = 1 if kind == "lines1" else 4
        cols = torch.rand(heads, tk, generator=g) < 0.1
        diags = torch.rand(heads, tk, generator=g) < 0.1
        diags[:, 0] = True
        p = pat.Pattern(tq, tk, cols, diags, n_last=20, scattered_cols=True)
    out = flex.attention(q, k, v, p, 0.25)
    torch.testing.assert_close(out, pat.reference_attention(q, k, v, p, 0.25), atol=1e-5, rtol=1e-5)
