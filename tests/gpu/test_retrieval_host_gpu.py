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
