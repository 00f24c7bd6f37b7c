"""RetrievalAttention's host split on CUDA (pinned staging, events, the device window on the GPU) against the loading
path: greedy tokens of a tiny random Llama in float32, and the bus bytes counted. Needs CUDA."""
import pytest
import torch

from scbench.methods.retrieval_attention import RetrievalAttention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_split_decode_on_cuda_equals_the_loading_path():
    from support import byte_tokenizer, random_llama

    from scbench.engines.hf import HFEngine

    tok = byte_tokenizer()
    model = random_llama(len(tok), layers=2, seed=0).to("cuda")
    engine = HFEngine("t", name="t", model=model, tokenizer=tok, device="cuda", dtype="float32")
    engine.decode_mode = "plain"
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 200, (700,), generator=g).tolist()
    follow = torch.randint(5, 200, (9,), generator=g).tolist()
    out, mems = {}, {}
    for split in (False, True):
        s = engine.session(RetrievalAttention(top_k=64, n_init=8, n_local=32, split=split))
        s.feed(prompt, compress=True, sparse=False)
        a = s.generate(16)
        mems[split] = s.memory()
        s.drop_last(len(a.tokens) - 1)
        s.feed(follow, compress=False, sparse=False)
        out[split] = [a.tokens, s.generate(8).tokens]
        layer = s.cache.layers[0]
        assert layer.keys.device.type == "cpu" and layer.window is not None or not split
    assert out[True] == out[False]
    assert 0 < mems[True]["loaded_bytes"] < mems[False]["loaded_bytes"] / 10
