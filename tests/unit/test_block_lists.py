"""The one-launch block-list build (scbench/kernels/block_lists.py) against the torch classification + stable
argsorts of flex.main_lists / flex.gathered_lists: equal entry for entry. CUDA, or CPU tensors in Triton's
interpreter (``TRITON_INTERPRET=1``); skipped without Triton."""
import pytest
import torch
from support import triton_kernel_marks

from scbench.kernels import block_lists, flex
from scbench.kernels import pattern as pat

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = triton_kernel_marks()


def lines(tq, tk, heads, n_cols, n_diags, seed, local=0):
    g = torch.Generator().manual_seed(seed)
    cols = torch.zeros(heads, tk, dtype=torch.bool)
    diags = torch.zeros(heads, tk, dtype=torch.bool)
    for h in range(heads):
        cols[h, torch.randperm(tk, generator=g)[:n_cols]] = True
        diags[h, torch.randperm(tk, generator=g)[:n_diags]] = True
    diags[:, :local] = True
    return pat.Pattern(tq, tk, cols.to(DEVICE), diags.to(DEVICE), scattered_cols=True)


def assert_equal_lists(a, b):
    for x, y, name in zip(a, b, ("kn", "ki", "fn", "fi")):
        assert x.dtype == y.dtype == torch.int32 and x.shape == y.shape, name
        assert torch.equal(x.cpu(), y.cpu()), name


CASES = [  # (tq, tk, heads, columns, diagonals, nearest diagonals always kept)
    (1024, 1024, 1, 0, 0, 300),  # a band shared by every head
    (1000, 1000, 3, 40, 60, 100),  # ragged edges, per-head lines
    (700, 1900, 2, 25, 200, 64),  # a later chunk over a cache (offset 1200)
    (2300, 2300, 2, 0, 500, 700),  # wide band + scattered diagonals, no columns
    (300, 5000, 2, 3000, 10, 0),  # dense columns: whole blocks of chosen columns
    (300, 429, 2, 10, 30, 5),  # offset 129: a query block's last row is a key block's first key (dmax = 0)
]


@pytest.mark.parametrize("tq,tk,heads,n_cols,n_diags,local", CASES)
def test_main_lists_kernel_equals_torch(tq, tk, heads, n_cols, n_diags, local):
    p = lines(tq, tk, heads, n_cols, n_diags, seed=tq + heads, local=local)
    assert_equal_lists(flex.main_lists(p, kernel=True), flex.main_lists(p, kernel=False))


def test_main_lists_band_pattern():
    p = pat.band(1500, 4000, n_init=128, n_local=513, device=DEVICE)
    assert_equal_lists(flex.main_lists(p, kernel=True), flex.main_lists(p, kernel=False))


@pytest.mark.parametrize("tq,tk,heads,n_cols,n_diags,local", CASES[1:])
def test_gathered_lists_kernel_equals_torch(tq, tk, heads, n_cols, n_diags, local):
    p = lines(tq, tk, heads, n_cols, n_diags, seed=7 * tq + heads, local=local)
    p.cols[0, : 7] = False  # heads with fewer columns: padded slots
    first = tk - tq + 127  # head 1's first column is query block 0's last position (dmax = 0)
    p.cols[1, : first] = False
    p.cols[1, first] = True
    n = int(p.cols.sum(-1).max())
    pos = torch.where(p.cols, torch.arange(tk, device=DEVICE), tk).sort(-1).values[:, :n]
    valid = pos < tk
    pos = torch.where(valid, pos, 0)
    assert_equal_lists(flex.gathered_lists(p, pos, valid, n, kernel=True),
                       flex.gathered_lists(p, pos, valid, n, kernel=False))


def test_rows_longer_than_one_chunk():
    """Rows of more key blocks than a program classifies at once (past 131,072 keys by default) loop over chunks:
    forced here with 16-block chunks over 40 key blocks, both kinds of list."""
    p = lines(300, 5000, 2, 300, 700, seed=3, local=200)
    k = torch.arange(40, device=DEVICE)[None, :]
    jmin, jmax = k * 128, (k * 128 + 127).clamp(max=4999)
    cum = p.prefix("diags")
    n_c = flex._count(p.prefix("cols"), jmin, jmax + 1)[:, 0]
    args = (cum, jmin.expand(2, -1), jmax.expand(2, -1), ((k + 1) * 128 <= 5000).expand(2, -1), n_c > 0,
            n_c == jmax - jmin + 1)
    kw = dict(tq=300, off=4700, nq=3, block=128, gathered=False)
    assert_equal_lists(block_lists.block_lists(*args, chunk=16, **kw), flex.main_lists(p, kernel=False))
    assert_equal_lists(block_lists.block_lists(*args, chunk=16, **kw), block_lists.block_lists(*args, **kw))
