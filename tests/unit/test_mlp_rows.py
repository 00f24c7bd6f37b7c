"""A long prefill's MLP in row blocks (scbench/engines/mlp_rows.py) against the module's own forward over every row."""
from __future__ import annotations

import pytest
import torch

from scbench.engines import mlp_rows
from scbench.registry import METHODS


def llama_mlp(hidden=64, inter=160, seed=0):
    from support import random_llama

    return random_llama(64, layers=1, hidden=hidden, intermediate=inter, seed=seed).model.layers[0].mlp.eval()


@pytest.mark.parametrize("block", [1, 7, 16, 50, 64])
def test_in_blocks_equals_one_call(block):
    """Any block size (dividing the rows or not, one row, all rows) gives the one call's rows; batch dims kept."""
    m = llama_mlp()
    x = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(block))
    with torch.no_grad():
        want, got = m(x), mlp_rows.in_blocks(m.forward, x, block)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_rows_patches_long_calls_and_restores(smol_tokenizer):
    """Inside ``rows`` a forward of more rows than the block goes through the blocks and gives the plain forward's
    logits; a short one, or a known length within the block, patches nothing; every forward is restored."""
    from support import make_tiny_engine

    eng = make_tiny_engine(smol_tokenizer, seed=1, layers=3)
    model = eng.model
    ids = torch.randint(10, 5000, (1, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    calls = []
    real = mlp_rows.in_blocks

    def spy(fwd, x, block):
        calls.append((x.shape[-2], block))
        return real(fwd, x, block)

    mlp_rows.in_blocks = spy
    try:
        with mlp_rows.rows(model, block=16) as patched, torch.no_grad():
            got = model(input_ids=ids).logits
            model(input_ids=ids[:, :16])  # within the block: the module's own forward
        with mlp_rows.rows(model, tokens=16, block=16) as none:
            pass
    finally:
        mlp_rows.in_blocks = real
    assert patched == 3 and none == 0
    assert calls == [(60, 16)] * 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())


def test_cpu_default_is_off_and_the_variable_turns_it_on(smol_tokenizer, monkeypatch):
    """On a CPU nothing is patched unless ``SCBENCH_MLP_ROWS`` is set; then a session's prefill runs its MLPs in
    blocks and gives the one call's logits; a bad value is refused by name."""
    from support import make_tiny_engine

    eng = make_tiny_engine(smol_tokenizer, seed=4, layers=2)
    monkeypatch.delenv("SCBENCH_MLP_ROWS", raising=False)
    with mlp_rows.rows(eng.model) as patched:
        assert patched == 0
    ids = torch.randint(10, 5000, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    plain = eng.session(METHODS.get("full")())
    plain.feed(ids, compress=False, sparse=False)
    seen = []
    real = mlp_rows.in_blocks
    monkeypatch.setattr(mlp_rows, "in_blocks", lambda f, x, b: (seen.append(b), real(f, x, b))[1])
    monkeypatch.setenv("SCBENCH_MLP_ROWS", "32")
    blocked = eng.session(METHODS.get("full")())
    blocked.feed(ids, compress=False, sparse=False)
    assert seen == [32, 32]
    torch.testing.assert_close(blocked.last_logits, plain.last_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(blocked.cache.layers, plain.cache.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("SCBENCH_MLP_ROWS", "lots")
    with pytest.raises(ValueError, match="SCBENCH_MLP_ROWS must be an integer >= 0"):
        mlp_rows.block_rows()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_blocks_lower_the_peak_at_the_8b_width():
    """bf16 on CUDA at Llama-3.1-8B's MLP width, 32K rows: blocks of 8,192 rows hold less than a third of the one
    call's transient memory besides their output, filled as they go (three [rows, 14336] activations at once: 2.82 GB
    against 0.70 + 0.27 on the H200; the one call frees its activations before its output) and agree with it to bf16
    rounding."""
    from support import llama8b_engine

    m = llama8b_engine(1).model.model.layers[0].mlp
    x = torch.randn(1, 32768, 4096, device="cuda", dtype=torch.bfloat16)
    peaks, outs = [], []
    for block in (0, 8192):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad(), mlp_rows.rows(m, block=block):
            outs.append(m(x))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    out = outs[0].numel() * outs[0].element_size()
    assert (peaks[1] - out) * 3 < peaks[0], (peaks, out)
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=2e-2, atol=2e-2)
