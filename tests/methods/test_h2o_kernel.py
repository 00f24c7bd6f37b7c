"""H2O's blockwise score kernels (scbench/kernels/h2o_scores.py) against the chunked torch reference (CUDA only)."""
import pytest
import torch

from scbench.kernels import h2o_scores
from scbench.methods.h2o import accumulated_attention


@pytest.mark.skipif(not torch.cuda.is_available() or h2o_scores.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,w,hq,hkv", [(2085, 2085, 8, 2), (3000, 301, 32, 8), (130, 130, 4, 4)])
def test_blockwise_scores_match_reference(dtype, n, w, hq, hkv):
    torch.manual_seed(n + w)
    keys = torch.randn(1, hkv, n, 128, device="cuda", dtype=dtype)
    queries = torch.randn(1, hq, w, 128, device="cuda", dtype=dtype)
    got = h2o_scores.accumulated_attention_triton(keys, queries)
    want = accumulated_attention(keys.float(), queries.float())
    assert got.shape == want.shape == (1, hkv, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(got.sum(-1), torch.full_like(got.sum(-1), w * hq / hkv), rtol=1e-3, atol=1e-3)
