"""RetrievalAttention's host split on CUDA (pinned staging, events, the device window on the GPU) against the loading
path: greedy tokens of a tiny random Llama in float32, and the bus bytes counted. Needs CUDA."""
import pytest
import torch
from support import two_turn_decode

from scbench.methods.retrieval_attention import RetrievalAttention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cuda_engine(dtype: torch.dtype, n_prompt: int):
    """A tiny random Llama on CUDA (plain decode loop), a prompt of ``n_prompt`` tokens and a 9-token follow-up."""
    from support import byte_tokenizer, random_llama

    from scbench.engines.hf import HFEngine

    tok = byte_tokenizer()
    model = random_llama(len(tok), layers=2, seed=0).to("cuda", dtype)
    engine = HFEngine("t", name="t", model=model, tokenizer=tok, device="cuda", dtype=str(dtype).split(".")[-1])
    engine.decode_mode = "plain"
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 200, (n_prompt,), generator=g).tolist()
    return engine, prompt, torch.randint(5, 200, (9,), generator=g).tolist()


def test_split_decode_on_cuda_equals_the_loading_path():
    engine, prompt, follow = cuda_engine(torch.float32, 700)
    out, mems = {}, {}
    for split in (False, True):
        out[split], _, s, mems[split] = two_turn_decode(
            engine, RetrievalAttention(top_k=64, n_init=8, n_local=32, split=split), prompt, follow, first=16, second=8)
        layer = s.cache.layers[0]
        assert layer.keys.device.type == "cpu" and layer.window is not None or not split
    assert out[True] == out[False]
    assert 0 < mems[True]["loaded_bytes"] < mems[False]["loaded_bytes"] / 10


def test_stream_path_equals_the_synchronous_split(monkeypatch):
    """bfloat16 on CUDA: the host half as a host function in the stream (methods/retrieval_host.stream_decode, the
    new token's rows queued too) against the synchronous split (SCBENCH_RA_ASYNC=0): the same greedy tokens, through
    a later prefill (its dense attention reads every host row) and a second decode; load_s counts the jobs."""
    from scbench.kernels import ra_host

    if not ra_host.available():
        pytest.skip(f"ra_host C kernel unavailable: {ra_host.error()}")
    engine, prompt, follow = cuda_engine(torch.bfloat16, 900)
    out, mems, jobs = {}, {}, {}
    for stream in ("1", "0"):
        monkeypatch.setenv("SCBENCH_RA_ASYNC", stream)
        out[stream], _, s, mems[stream] = two_turn_decode(
            engine, RetrievalAttention(top_k=64, n_init=8, n_local=32), prompt, follow, first=24, second=12)
        jobs[stream] = [getattr(layer.staging, "job", None) is not None for layer in s.cache.layers]
        k = s.cache.layers[0].keys
        assert k.device.type == "cpu" and k.shape[-2] == s.pos
    assert jobs == {"1": [True, True], "0": [False, False]}
    assert out["1"] == out["0"]
    assert mems["1"]["load_s"] > 0 and mems["1"]["loaded_bytes"] == mems["0"]["loaded_bytes"]


def test_rows_to_device_equals_the_view_copy():
    """A host tier's pinned capacity buffer to the GPU block by block (``Rows.to_device``) against ``view.to``."""
    from scbench.kv.offload import Rows

    rows = Rows(torch.device("cpu"), torch.device("cuda"), reserve=37)
    g = torch.Generator().manual_seed(0)
    rows.append(torch.randn(2, 3, 50, 16, generator=g).bfloat16())
    rows.append(torch.randn(2, 3, 1, 16, generator=g).bfloat16().cuda())
    assert rows.pin and rows.buf.is_pinned() and rows.buf.shape[-2] > rows.n == 51
    for start, end in ((0, None), (5, 40), (50, 51)):
        got = rows.to_device(torch.device("cuda"), start, end)
        torch.cuda.synchronize()
        assert got.is_contiguous() and torch.equal(got.cpu(), rows.buf[..., start:end or rows.n, :])


@pytest.mark.parametrize("contiguous", [True, False])
def test_rows_block_copy_equals_the_torch_copy(monkeypatch, contiguous):
    """Rows from the GPU into a host tier's pinned buffer, one asynchronous copy per run of rows
    (``Rows._copy_blocks``), against torch's copy into the strided view (``SCBENCH_HOST_BLOCK_COPY=0``): the same
    bits, first fill, a growth and an append into the spare rows; a non-contiguous source (a view of a longer
    cache) too."""
    from scbench.kv import tier as tier_mod
    from scbench.kv.offload import Rows

    g = torch.Generator().manual_seed(1)
    chunks = []
    for t in (300, 70, 100):
        x = torch.randn(2, 3, t + 9, 16, generator=g).bfloat16().cuda()
        chunks.append(x[..., 4 : t + 4, :] if not contiguous else x[..., :t, :].contiguous())
    got = {}
    for block in (False, True):
        monkeypatch.setattr(tier_mod, "BLOCK_COPY", block)
        rows = Rows(torch.device("cpu"), torch.device("cuda"), reserve=80)
        calls = []
        orig = rows._copy_blocks
        monkeypatch.setattr(rows, "_copy_blocks", lambda x, s: calls.append(orig(x, s)) or calls[-1])
        for x in chunks:
            rows.append(x)
        assert rows.buf.is_pinned() and calls == [block] * 3
        got[block] = rows.view.clone()
    assert torch.equal(got[True], got[False])
    assert torch.equal(got[True], torch.cat([x.cpu() for x in chunks], dim=-2))


def test_park_put_get_pinned_equals_pageable(monkeypatch):
    """``Tier.put`` from the GPU into pinned memory (asynchronous copies) and back, against the pageable path."""
    from scbench.kv import tier as tier_mod
    from scbench.kv.tier import Tier

    g = torch.Generator().manual_seed(2)
    src = {"k": torch.randn(1, 4, 333, 32, generator=g).bfloat16().cuda(),
           "v": torch.randn(1, 4, 400, 32, generator=g).cuda()[..., :333, :]}
    for block in (False, True):
        monkeypatch.setattr(tier_mod, "BLOCK_COPY", block)
        tier = Tier("cpu")
        tier.put("x", src)
        assert all(t.is_pinned() == block for t in tier._held["x"].values())
        back = tier.get("x", "cuda")
        assert all(torch.equal(back[k], src[k]) and back[k].dtype == src[k].dtype for k in src)
        tier.close()


def test_pinned_empty_is_page_locked_and_released(monkeypatch):
    """``pinned_empty`` above its threshold: exact size, page-locked (an asynchronous copy from the GPU lands
    whole), and unregistered, with success, once the last view is gone."""
    import gc

    from scbench.kv.pinned import MIN_BYTES, pinned_empty

    real = torch.cuda.cudart()
    released = []

    class Recording:
        cudaHostRegister = staticmethod(real.cudaHostRegister)  # noqa: N815 - the runtime's names

        @staticmethod
        def cudaHostUnregister(addr):  # noqa: N802
            released.append((addr, int(real.cudaHostUnregister(addr))))
            return released[-1][1]

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Recording)
    n = MIN_BYTES // 2 + 123  # bfloat16 elements: just above the threshold, not a power of two
    t = pinned_empty((n,), torch.bfloat16)
    assert t.is_pinned() and t.numel() == n
    src = torch.randn(n, device="cuda").bfloat16()
    t.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(t, src.cpu())
    addr = t.data_ptr()
    view = t[5:]
    del t
    gc.collect()
    assert released == [] and view.is_pinned()
    del view
    gc.collect()
    assert released == [(addr, 0)]


def test_fork_host_copy_equals_the_layers():
    """The grouped sweep's host copy of a shared prefill (``fork._copy_layers(..., "host")``): exact-size
    page-locked buffers filled asynchronously hold the layers' bits once it returns (one layer above the
    registration threshold, one below, one a non-contiguous view)."""
    from types import SimpleNamespace

    from scbench.engines.fork import _copy_layers

    g = torch.Generator(device="cuda").manual_seed(3)
    shapes = ((1, 8, 8192, 128), (1, 2, 100, 64))
    layers = [SimpleNamespace(keys=torch.randn(s, device="cuda", generator=g).bfloat16(),
                              values=torch.randn(s, device="cuda", generator=g).bfloat16()) for s in shapes]
    big = torch.randn(1, 2, 300, 64, device="cuda", generator=g)
    layers.append(SimpleNamespace(keys=big[..., :200, :], values=big[..., 50:250, :]))
    out = _copy_layers(SimpleNamespace(layers=layers), "host")
    for layer, (hk, hv) in zip(layers, out):
        assert hk.is_pinned() and hv.is_pinned() and hk.device.type == "cpu"
        assert torch.equal(hk, layer.keys.cpu()) and torch.equal(hv, layer.values.cpu())
