"""End to end through HFEngine with a tiny random-weight Llama: sparse prefill with a window covering
everything equals full attention; a small window changes the logits and reports density < 1."""
import os
from pathlib import Path

import pytest
import torch

from scbench.methods.ashape import AShape
from scbench.methods.full import FullAttention
from scbench.methods.trishape import TriShape
from scbench.methods.vertical_slash import VerticalSlash

TOKENIZER = Path(os.path.expanduser("~/.cache/scbench/models/smollm2-135m-instruct-f32"))


@pytest.fixture(scope="module")
def engine():
    if not (TOKENIZER / "tokenizer_config.json").exists() and not (TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"no converted tokenizer at {TOKENIZER}")
    from transformers import AutoTokenizer

    from support import make_tiny_engine

    return make_tiny_engine(AutoTokenizer.from_pretrained(TOKENIZER), window=2048)


def feed_two(engine, method, sparse_second: bool = True):
    """Feed a context (sparse), then a follow-up chunk (Tk > Tq); return both logits and stats."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 5000, (300,), generator=g).tolist()
    s = engine.session(method)
    a = s.feed(ids[:240], compress=False, sparse=True)
    la = s.last_logits.clone()
    b = s.feed(ids[240:], compress=False, sparse=sparse_second)
    return la, s.last_logits.clone(), a, b


@pytest.mark.parametrize("method", [
    AShape(n_init=4, n_local=512),
    TriShape(n_init=4, n_local=512, n_last=8),
    VerticalSlash(vertical_size=512, slash_size=512, last_q=16, init_cols=4, local_diags=8),
])
def test_covering_window_equals_full_attention(engine, method):
    la, lb, a, b = feed_two(engine, method)
    fa, fb, _, _ = feed_two(engine, FullAttention())
    torch.testing.assert_close(la, fa, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lb, fb, atol=1e-4, rtol=1e-4)
    assert a.attn_density == 1.0 and b.attn_density == 1.0
    assert a.attn_cells == 2 * 4 * 240 * 241 // 2


@pytest.mark.parametrize("method", [
    AShape(n_init=4, n_local=16),
    TriShape(n_init=4, n_local=16, n_last=8),
    VerticalSlash(vertical_size=8, slash_size=16, last_q=16, init_cols=4, local_diags=8),
])
def test_small_window_is_sparse(engine, method):
    la, _, a, b = feed_two(engine, method, sparse_second=False)
    fa, _, _, _ = feed_two(engine, FullAttention())
    assert not torch.allclose(la, fa, atol=1e-4)
    assert 0.0 < a.attn_density < 0.3
    assert b.attn_density == 1.0 and b.attn_cells == 2 * 4 * (60 * 240 + 60 * 61 // 2)
