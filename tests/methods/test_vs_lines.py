"""Vertical-slash's GPU estimate (scbench/kernels/vs_lines.py) against the torch reference line_scores: the same
column and diagonal sums within float32 rounding, and the same top lines. CUDA, or CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1``); skipped without Triton."""
import pytest
import torch
from support import triton_kernel_marks

from scbench.kernels import vs_lines
from scbench.methods.vertical_slash import line_scores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = triton_kernel_marks()


@pytest.mark.parametrize("hq,hkv,tq,tk,last_q", [(4, 2, 300, 300, 64), (2, 1, 40, 500, 64), (4, 4, 200, 777, 17),
                                                 (2, 1, 100, 5000, 64)])  # rows over several LSE chunks
def test_line_scores_kernel_matches_torch(hq, hkv, tq, tk, last_q):
    g = torch.Generator().manual_seed(tk)
    q = (torch.randn(hq, tq, 32, generator=g) * 2).to(DEVICE)
    k = (torch.randn(hkv, tk, 32, generator=g) * 2).to(DEVICE)
    k[:, 3] *= 4  # a heavy column
    v_ref, s_ref = line_scores(q, k, 32**-0.5, last_q)
    v, s = vs_lines.line_scores_triton(q, k, 32**-0.5, last_q)
    assert v.dtype == s.dtype == torch.float32 and v.shape == s.shape == (hq, tk)
    torch.testing.assert_close(v, v_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-6)
    n = min(last_q, tq)
    torch.testing.assert_close(v.sum(-1), torch.full((hq,), float(n), device=DEVICE), rtol=1e-4, atol=0)
    assert torch.equal(v.topk(20, -1).indices.sort(-1).values, v_ref.topk(20, -1).indices.sort(-1).values)
