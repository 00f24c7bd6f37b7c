"""The decode plugins' CUDA paths (Triton select and attention kernels inside the captured step) against the plain
loop, through the engine, on CUDA. The kernel tests use 2-4 query heads per KV head group of 16-128 dims; this also
runs SmolLM2-135M's shape (9 query / 3 KV heads of 64 dims), where a real-model comparison
(scripts/bench_agreement.py) found RetrievalAttention's graph decode far from its plain loop. Needs CUDA."""
from types import SimpleNamespace

import pytest
import torch

from scbench.kernels.paged_decode import paged_attention_torch
from scbench.methods.kivi import KIVI
from scbench.methods.quest import Quest
from scbench.methods.retrieval_attention import RetrievalAttention
from scbench.methods.retrieval_fast import RetrievalDecode

from support import random_llama, two_turn_decode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPES = {"g2d16": dict(hidden=64, heads=4, kv_heads=2), "smollm2": dict(hidden=576, heads=9, kv_heads=3)}
METHODS = {"retrieval_device": lambda: RetrievalAttention(top_k=512, n_init=16, n_local=64, tier="device"),
           "quest": lambda: Quest(budget=512, dense_layers=1),
           "kivi": lambda: KIVI(bits=2)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", METHODS)
def test_cuda_graph_decode_equals_plain_float32(smol_tokenizer, shape, name):
    from scbench.engines.hf import HFEngine

    with torch.device("cuda"):
        model = random_llama(len(smol_tokenizer), layers=2, window=4096, bos_token_id=smol_tokenizer.bos_token_id,
                             eos_token_id=smol_tokenizer.eos_token_id, **SHAPES[shape])
    engine = HFEngine("tiny-random-llama", name="tiny-random-llama", model=model, tokenizer=smol_tokenizer,
                      device="cuda", dtype="float32")
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(5, 2000, (1500,), generator=g).tolist()
    follow = torch.randint(5, 2000, (17,), generator=g).tolist()
    plain, ppath, _, _ = two_turn_decode(engine, METHODS[name](), prompt, follow, "plain")
    fast, fpath, _, _ = two_turn_decode(engine, METHODS[name](), prompt, follow, "fast")
    assert ppath == ["plain"] * 2 and fpath == ["graph"] * 2
    assert fast == plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 2, 16), (9, 3, 64), (32, 8, 128)])
def test_retrieval_attend_cuda_equals_torch_rows(shape, dtype):
    """One layer's captured-step attention (CUDA select + paged kernel) against the torch rows and gathered
    attention, at SmolLM2's length and budgets (7,001 keys, top 4,096 + 128 + 512)."""
    hq, hkv, d = shape
    c, n = 7168, 7001
    g = torch.Generator().manual_seed(hq)
    k, v = (torch.randn(1, hkv, c, d, generator=g).to("cuda", dtype) for _ in range(2))
    q = torch.randn(1, hq, 1, d, generator=g).to("cuda", dtype)
    kv = SimpleNamespace(k=[k], v=[v], at=torch.tensor([n - 1], device="cuda"), lengths=[n - 1])
    plugin = RetrievalDecode(RetrievalAttention(top_k=4096, n_init=128, n_local=512, tier="device"))
    plugin.allocate(kv, None)
    got = plugin.attend(kv, 0, q, k, v, d**-0.5).float()
    ref = RetrievalDecode(RetrievalAttention(top_k=4096, n_init=128, n_local=512, tier="device"))
    ref.select = "topk"  # the torch branch of rows()
    rows = ref.rows(kv, 0, q)
    want = paged_attention_torch(q.float(), k.float(), v.float(), rows, torch.tensor([n], device="cuda"), 1, d**-0.5)
    err = ((got - want).norm() / want.norm()).item()
    assert err < (1e-4 if dtype == torch.float32 else 1e-2), err
