"""Compression methods on CUDA: real bytes on the GPU (packed for KIVI) and, as a script, a cost table. Needs CUDA.

As a test: a Llama-3.1-8B-shaped layer stack (hidden 4096, 32 query / 8 KV heads, head_dim 128, bf16; few
layers, random weights) prefills a few thousand tokens per method; resident bytes must equal the analytic
size within 1% and every cache tensor must live on the GPU.
As a script (``python tests/test_compression_gpu.py --tokens 32768 --layers 32``) it prints one JSON row per
method: prefill and compression seconds, decode tokens/s, resident KV bytes vs full, peak GPU memory.
"""
import json
import time

import pytest
import torch

from support import llama8b_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

METHODS = {
    "full": {"name": "full"},
    "streamingllm-1/32": {"name": "streamingllm"},  # n_init / n_local filled from tau = 1/32
    "snapkv-1/32": {"name": "snapkv", "budget": 1 / 32},
    "pyramidkv-1/32": {"name": "pyramidkv", "budget": 1 / 32},
    "h2o-1/32": {"name": "h2o", "budget": 1 / 32},
    "kivi-2bit": {"name": "kivi", "bits": 2},
    "kivi-4bit": {"name": "kivi", "bits": 4},
}


def measure(engine, cfg: dict, tokens: int, decode: int = 64) -> dict:
    from scbench.registry import METHODS

    cfg = dict(cfg)
    if cfg["name"] == "streamingllm":  # the same 1/32 of the context: 128 sinks (fewer for short ones) + recent
        cfg["n_init"] = min(128, tokens // 32 // 4)
        cfg["n_local"] = tokens // 32 - cfg["n_init"]
    ids = torch.randint(0, 256, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    s = engine.session(METHODS.get(cfg["name"])(**{k: v for k, v in cfg.items() if k != "name"}))
    fs = s.feed(ids, compress=True, sparse=False)
    after_prefill = s.memory()
    gen = s.generate(decode)
    mem = s.memory()
    where = {t.device.type for layer in s.cache.layers for t in tensors_of(layer)}
    row = {"method": cfg, "tokens": tokens, "prefill_s": round(fs.seconds, 3), "compress_s": round(fs.compress_s, 4),
           "decode_tok_s": round((len(gen.tokens) - 1) / gen.decode_s, 2), "kv_bytes_after_prefill": after_prefill["kv_bytes"],
           "kv_bytes": mem["kv_bytes"], "kv_full_bytes": mem["kv_full_bytes"],
           "effective_ratio": round(mem["kv_bytes"] / mem["kv_full_bytes"], 4), "peak_mem_bytes": mem["peak_mem_bytes"],
           "devices": sorted(where)}
    del s
    return row


def tensors_of(layer):
    if hasattr(layer, "kchunks"):
        return [t for c in (*layer.kchunks, *layer.vchunks) for t in c] + [layer.keys, layer.values]
    return [layer.keys, layer.values]


def test_gpu_bytes_match_budget():
    from scbench.kv.quant import analytic_nbytes
    from scbench.methods.pyramidkv import layer_budgets

    layers, n, per_token = 2, 4096, 2 * 8 * 128 * 2
    engine = llama8b_engine(layers)
    for name, cfg in METHODS.items():
        row = measure(engine, cfg, n, decode=8)
        assert row["devices"] == ["cuda"], name
        if cfg["name"] == "kivi":
            want = layers * analytic_nbytes(n, batch=1, heads=8, head_dim=128, bits=cfg["bits"], group=32, residual=32, elt=2)
        elif cfg["name"] == "pyramidkv":
            want = sum(layer_budgets(n // 32, n, 32, layers, 20)) * per_token
        elif cfg["name"] == "full":
            want = layers * n * per_token
        else:
            want = layers * (n // 32) * per_token
        assert row["kv_bytes_after_prefill"] == pytest.approx(want, rel=0.01), name


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--only", default=None, help="comma-separated method keys")
    ap.add_argument("--no-cudnn-sdpa", action="store_true", help="keep SDPA off its cuDNN backend")
    a = ap.parse_args()
    if a.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    engine = llama8b_engine(a.layers)
    measure(engine, METHODS["full"], 1024, decode=4)  # warm-up
    for key, cfg in METHODS.items():
        if a.only and key not in a.only.split(","):
            continue
        t = time.perf_counter()
        row = measure(engine, cfg, a.tokens, a.decode)
        row.update(key=key, layers=a.layers, device=torch.cuda.get_device_name(), wall_s=round(time.perf_counter() - t, 1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
