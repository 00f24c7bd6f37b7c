"""Cross-check scbench's StreamingLLM, SnapKV and PyramidKV against NVIDIA kvpress: same model, prompt and budget.

For every layer and KV head, the positions kept by our method (scbench HFEngine session, compression after
the prefill) are compared with those kept by the corresponding kvpress press (forward hooks during a plain
transformers prefill). Kept positions are recovered by matching the compressed keys to the full cache's keys.
Reports, per method, the agreement rate |ours & theirs| / min(|ours|, |theirs|) averaged over layers and
heads (1.0 when the smaller set is contained in the larger one, as it is for top-k under the same scores),
and the per-layer kept counts. PyramidKV's per-layer counts differ by design: kvpress counts the window
inside each layer's budget and falls back to uniform budgets when p / beta < window; we follow the
reference code (KVCache-Factory), which adds the window to a prefix budget and uses the pyramid whenever
the prompt has at least 2p tokens. The cross-check uses beta=4 so that both sides build a pyramid.

kvpress pins transformers<5.3 and cannot join our environment; install it beside it, without dependencies:
    pip install --no-deps --target /tmp/kvpress_pkg kvpress "cachetools<6" "fire<0.7" termcolor
    PYTHONPATH=/tmp/kvpress_pkg python -m pytest -q tests/test_compression_kvpress.py      # tiny random Llama
    PYTHONPATH=/tmp/kvpress_pkg python tests/test_compression_kvpress.py [--model embedded:smollm2] [--tokens 1024]
The test is skipped when kvpress is not importable. As a script it prints the JSON report (default: the
embedded SmolLM2, converted on first use; ``--tiny`` for the random-weight Llama).
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from scbench.engines.base import cache_kw


def kept_positions(full: torch.Tensor, kept: torch.Tensor) -> list[list[set[int]]]:
    """full: [1, H, n, D], kept: [1, H, k, D] -> per head, the set of full positions whose keys were kept."""
    out = []
    for h in range(full.shape[1]):
        d = torch.cdist(kept[0, h].double(), full[0, h].double())  # [k, n]
        out.append(set(d.argmin(-1).tolist()))
    return out


def ours(engine, method, ids):
    s = engine.session(method)
    s.feed(ids, compress=True, sparse=False)
    return [(layer.keys.clone(), layer.values.clone()) for layer in s.cache.layers]


def theirs(model, press, ids):
    from transformers import DynamicCache

    def add_cache_position(module, args, kwargs):  # kvpress 0.5.5 reads it; transformers 5.23 no longer passes it
        kwargs["cache_position"] = torch.arange(len(ids))
        return args, kwargs

    cache = DynamicCache(config=model.config)
    shims = [layer.self_attn.register_forward_pre_hook(add_cache_position, with_kwargs=True)
             for layer in model.model.layers]
    try:
        with torch.inference_mode(), press(model):
            model(input_ids=torch.tensor([ids]), **{cache_kw(model): cache}, use_cache=True)
    finally:
        for h in shims:
            h.remove()
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def compare(full, a, b) -> dict:
    rates, counts = [], []
    for (fk, _), (ak, _), (bk, _) in zip(full, a, b):
        pa, pb = kept_positions(fk, ak), kept_positions(fk, bk)
        rates += [len(x & y) / min(len(x), len(y)) for x, y in zip(pa, pb)]  # nested top-k sets agree fully
        counts.append((ak.shape[-2], bk.shape[-2]))
    return {"agreement": sum(rates) / len(rates), "min_head_agreement": min(rates),
            "kept_ours_theirs_per_layer": counts}


def run(engine, ids, ratio: float, window: int = 32, beta: int = 4) -> dict:
    from kvpress import PyramidKVPress, SnapKVPress, StreamingLLMPress

    from scbench.methods.full import FullAttention
    from scbench.methods.pyramidkv import PyramidKV
    from scbench.methods.snapkv import SnapKV
    from scbench.methods.streamingllm import StreamingLLM

    n = len(ids)
    n_kept = max(1, int(n * (1 - ratio)))  # kvpress's count for a compression ratio
    model = engine.model
    full = ours(engine, FullAttention(), ids)
    model.set_attn_implementation("sdpa")  # kvpress runs on the stock attention
    try:
        pairs = {
            "streamingllm": (StreamingLLM(n_init=4, n_local=n_kept - 4), StreamingLLMPress(compression_ratio=ratio, n_sink=4)),
            "snapkv": (SnapKV(budget=n_kept, window=window), SnapKVPress(compression_ratio=ratio, window_size=window)),
            # kvpress's pyramid puts the window inside each layer's count and averages n_kept per layer; ours adds
            # the window to a prefix budget (KVCache-Factory). Same total here: our budget = n_kept.
            "pyramidkv": (PyramidKV(budget=n_kept, window=window, beta=beta),
                          PyramidKVPress(compression_ratio=ratio, window_size=window, beta=beta)),
        }
        kv = {name: theirs(model, press, ids) for name, (_, press) in pairs.items()}
    finally:
        model.set_attn_implementation("scbench")
    report = {"tokens": n, "ratio": ratio, "n_kept": n_kept, "window": window, "pyramid_beta": beta}
    for name, (method, _) in pairs.items():
        report[name] = compare(full, ours(engine, method, ids), kv[name])
    return report


def tiny_engine(layers=4, kv_heads=2, head_dim=32, seed=0):
    from support import byte_tokenizer, random_llama

    from scbench.engines.hf import HFEngine

    model = random_llama(300, layers=layers, hidden=2 * kv_heads * head_dim, heads=2 * kv_heads, kv_heads=kv_heads,
                         intermediate=256, window=8192, seed=seed)
    return HFEngine(path="unused", model=model, tokenizer=byte_tokenizer(), dtype="float32")


def test_same_positions_as_kvpress():
    """StreamingLLM and SnapKV keep exactly kvpress's positions; PyramidKV differs only by its budget rule."""
    pytest.importorskip("kvpress")
    engine = tiny_engine()
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    report = run(engine, ids, ratio=0.75)
    assert report["streamingllm"]["agreement"] == 1.0
    assert report["snapkv"]["agreement"] >= 0.99  # float ties only
    assert all(a == b for a, b in report["snapkv"]["kept_ours_theirs_per_layer"])
    assert report["pyramidkv"]["agreement"] >= 0.99
    total = sum(a for a, _ in report["pyramidkv"]["kept_ours_theirs_per_layer"])
    assert abs(total - 4 * report["n_kept"]) <= 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--tiny", action="store_true", help="a random-weight 4-layer Llama instead of a real model")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=0.75, help="kvpress compression ratio (fraction evicted)")
    a = ap.parse_args()
    from scbench.engines.hf import HFEngine

    engine = tiny_engine() if a.tiny else HFEngine(a.model, dtype="float32", device="cpu")
    text = " ".join(open(p).read() for p in sorted(__import__("glob").glob("methods/*.py")))
    ids = engine.encode(text, add_special_tokens=False)[: a.tokens]
    report = run(engine, ids, a.ratio)
    report["model"] = "tiny-random-llama" if a.tiny else a.model
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
