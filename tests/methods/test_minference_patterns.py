"""Vertical-slash against MInference's own pattern definition, on the CPU.

`minference` does not install without CUDA (see tests/reference/minference_patterns.py), and its attention kernels
are Triton / CUDA; what can run here is its index selection (pure PyTorch, copied verbatim). For random q / k of one
head, the key columns and diagonals our VerticalSlash pattern keeps must be the ones MInference passes to its kernel
(MInference's fixed 30 initial columns and 100 local diagonals = our init_cols / local_diags). A-shape and Tri-shape
have no PyTorch definition in MInference (Triton kernels only); tests/unit/test_sparse_patterns.py checks them
against hand-built masks.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from scbench.methods.vertical_slash import VerticalSlash

_spec = importlib.util.spec_from_file_location(
    "minference_patterns", Path(__file__).resolve().parents[1] / "reference" / "minference_patterns.py")
_ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref)
vertical_and_slash_indices = _ref.vertical_and_slash_indices


@pytest.mark.parametrize("n, vertical, slash, seed", [(256, 40, 120, 0), (300, 64, 150, 1), (97, 30, 100, 2)])
def test_vertical_slash_keeps_minference_lines(n, vertical, slash, seed):
    g = torch.Generator().manual_seed(seed)
    d = 32
    q, k = torch.randn(1, 1, n, d, generator=g) * 2, torch.randn(1, 1, n, d, generator=g) * 2
    cols_ref, diags_ref = vertical_and_slash_indices(q.clone(), k.clone(), vertical, slash, d)
    m = VerticalSlash(vertical_size=vertical, slash_size=slash, last_q=64, init_cols=30, local_diags=100)
    p = m.pattern(0, q, k, d ** -0.5)
    ours_cols = set(p.cols[0].nonzero().flatten().tolist())
    ours_diags = set(p.diags[0].nonzero().flatten().tolist())
    theirs_cols = set(cols_ref.flatten().tolist())
    theirs_diags = set(diags_ref.flatten().tolist())
    assert len(theirs_cols) == min(n, vertical) and len(theirs_diags) == min(n, slash)
    assert ours_cols == theirs_cols
    assert ours_diags == theirs_diags
