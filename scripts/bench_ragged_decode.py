"""Ragged per-head caches on the GPU fast path (methods/ragged_fast.py, scbench/kernels/ragged_decode.py).

    python scripts/bench_ragged_decode.py [--tokenizer DIR] [--out results/perf/ragged_decode.json]

1. Correctness on CUDA: the Triton kernel against the float64 per-head reference (float32 and bfloat16), and greedy
   tokens of the CUDA-graph path against the plain loop for AdaKV, KVzip (pair) and DuoAttention on a small random
   Llama in float32 (the tokenizer from --tokenizer, or a byte-level one).
2. One layer's decode attention at Llama-3.1-8B's shape (8 KV heads x 4 query heads, head_dim 128, bf16), CUDA
   events, mean of 200 calls: ragged prefixes (AdaKV-like: 4,096 per head on average, spread +-50 %; Duo-like: half
   the heads at the full context, half at 4,096) vs dense split-K decode over 4,096 and over the full context.
Prints one JSON object (and writes it to --out when given).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def kernel_checks(dev) -> dict:
    from scbench.kernels import ragged_decode as rd

    out = {}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        worst = 0.0
        for lengths, c, at in [([5, 40, 17, 300], 256, 6), ([4096, 100, 2500, 1], 512, 300), ([1, 1], 256, -1)]:
            h, d, grp = len(lengths), 128, 4
            pk, pv = (torch.randn(sum(lengths), d, generator=g).to(dtype) for _ in range(2))
            sk, sv = (torch.randn(1, h, c, d, generator=g).to(dtype) for _ in range(2))
            q = torch.randn(1, h * grp, 1, d, generator=g).to(dtype)
            offs = torch.tensor([sum(lengths[:i]) for i in range(h)])
            got = rd.ragged_decode_triton(q.to(dev), pk.to(dev), pv.to(dev), offs.to(dev),
                                          torch.tensor(lengths, device=dev), rd.WorkList(lengths, c, dev),
                                          sk.to(dev), sv.to(dev),
                                          torch.tensor([at], device=dev))
            want = rd.reference_ragged_decode(q, pk, pv, lengths, sk, sv, at)
            worst = max(worst, float((got.cpu().double() - want.double()).abs().max()))
        out[str(dtype)] = worst
    return out


def greedy_checks(dev, tokenizer: str | None) -> dict:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from scbench.engines.hf import HFEngine
    from scbench.methods.adakv import AdaKV
    from scbench.methods.duo_attention import DuoAttention
    from scbench.methods.kvzip import KVzip

    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    if tok is None:
        raise SystemExit("--tokenizer is needed (the embedded model's tokenizer folder)")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    engine = HFEngine("tiny-random-llama", name="tiny-random-llama", model=model, tokenizer=tok, device=str(dev),
                      dtype="float32")
    gates = Path(tempfile.mkdtemp()) / "gates.json"
    gates.write_text(json.dumps({"gates": [[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]}))
    makers = {"adakv": lambda: AdaKV(budget=160, window=32),
              "kvzip_pair": lambda: KVzip(budget=128, level="pair", chunk=256),
              "duo_attention": lambda: DuoAttention(heads=str(gates), retrieval_ratio=0.5, n_init=4, n_local=60)}
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 20000, (900,), generator=gen).tolist()
    follow = torch.randint(100, 20000, (30,), generator=gen).tolist()
    res = {}
    for name, make in makers.items():
        runs = {}
        for mode in ("plain", "fast"):
            engine.decode_mode = mode
            s = engine.session(make())
            s.feed(prompt, compress=True, sparse=False)
            a = s.generate(40)
            s.drop_last(len(a.tokens) - 1)
            s.feed(follow, compress=False, sparse=False)
            b = s.generate(40)
            runs[mode] = ([a.tokens, b.tokens], [a.decode_path, b.decode_path], s.memory()["kv_bytes"])
        res[name] = {"equal": runs["plain"][0] == runs["fast"][0], "paths": runs["fast"][1],
                     "kv_bytes_equal": runs["plain"][2] == runs["fast"][2]}
    engine.decode_mode = "auto"
    return res


def time_call(fn, n=200) -> float:
    for _ in range(5):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n * 1000.0  # us


def microbench(dev) -> dict:
    from scbench.engines.fastdecode import split_kv_decode_attention
    from scbench.kernels import ragged_decode as rd

    h, grp, d, dt, c = 8, 4, 128, torch.bfloat16, 512
    q = torch.randn(1, h * grp, 1, d, device=dev, dtype=dt)
    sk, sv = (torch.randn(1, h, c, d, device=dev, dtype=dt) for _ in range(2))
    at = torch.tensor([100], device=dev)
    out = {}
    for ctx in (32000, 128000):
        shapes = {"adakv_like": [int(4096 * f) for f in (0.5, 0.7, 0.9, 1.0, 1.0, 1.1, 1.3, 1.5)],
                  "duo_like": [ctx] * 4 + [4096] * 4}
        row = {}
        for name, lengths in shapes.items():
            pk, pv = (torch.randn(sum(lengths), d, device=dev, dtype=dt) for _ in range(2))
            offs = torch.tensor([sum(lengths[:i]) for i in range(h)], device=dev)
            ln = torch.tensor(lengths, device=dev)
            rows = rd.head_of_rows(lengths, dev)
            work = rd.WorkList(lengths, c, dev)
            row[name + "_triton_us"] = time_call(lambda: rd.ragged_decode_triton(q, pk, pv, offs, ln, work, sk, sv,
                                                                                  at))
            row[name + "_torch_us"] = time_call(lambda: rd.ragged_decode_attention(q, pk, pv, rows, sk, sv, at))
            row[name + "_tokens"] = sum(lengths)
        for n in (4096, ctx):
            k, v = (torch.randn(1, h, n + c, d, device=dev, dtype=dt) for _ in range(2))
            a2 = torch.tensor([n + 100], device=dev)
            row[f"dense_{n}_split_kv_us"] = time_call(lambda: split_kv_decode_attention(q, k, v, a2))
            del k, v
        out[str(ctx)] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "kernel_max_abs_err": kernel_checks(dev), "greedy_graph_vs_plain": greedy_checks(dev, a.tokenizer),
           "attention_us_per_layer_call": microbench(dev)}
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
