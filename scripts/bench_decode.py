"""`make bench`: prefill and decode through the harness, per method and context length, against what the
hardware allows.

    python scripts/bench_decode.py                      # a GPU: Llama-3.1-8B shape, random bf16 weights
    python scripts/bench_decode.py --cpu                # quick look: the embedded SmolLM2-135M, float32, CPU
    python scripts/bench_decode.py --lengths 8192 32768 --methods full snapkv --decode-tokens 128 --out F

Per (method, length) row: prefill seconds through ``HFSession.feed`` (compression excluded, reported apart) and
its TFLOP/s; ``overhead``: feed time / a bare ``model(...)`` forward of the same tokens with SDPA and a
``DynamicCache`` - 1; decode tokens/s of the engine's fast path (``graph`` on CUDA, ``static`` on CPU; steady
state, the one-time graph capture reported apart) and of the plain loop (full attention only); ``bound``: the
decode rate memory bandwidth allows, 1 / ((weight bytes read per token + resident KV bytes) / copy bandwidth),
with the copy bandwidth measured here (2 x bytes / time of a large device copy) and the weight bytes counted
from the model (the input embedding table excluded: a step reads one row of it); ``frac``: fast tok/s / bound;
``same``: how many leading tokens the fast path shares with the plain loop (``plain_tokens`` compared); peak
memory (CUDA: max allocated; CPU: max RSS). FLOPs: 2 x non-embedding parameters (lm_head excluded, the
prefill keeps one logit row) x tokens + causal attention 2 x layers x query heads x head_dim x tokens^2.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from scbench.devices import sync as _sync
from scbench.engines import fastdecode
from scbench.engines.base import cache_kw
from scbench.engines.hf import HFEngine
from scbench.kv import cache as kvc
from scbench.registry import METHODS

GPU_METHODS = {
    "full": {},
    "streamingllm": {"n_init": 128, "n_local": 3968},
    "snapkv": {"budget": 4096},
    "pyramidkv": {"budget": 4096},
}
CPU_METHODS = {"full": {}, "streamingllm": {"n_init": 32, "n_local": 224}, "snapkv": {"budget": 256}}


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s moved by a device copy (read + write) of ``nbytes``, median of 10."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(11):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times[1:])


def random_llama_8b(device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """Llama-3.1-8B-shaped LlamaForCausalLM with random weights (bf16 by default), built on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, eos_token_id=128009, bos_token_id=128000, tie_word_embeddings=False)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    # A bench never reads text: a stand-in tokenizer that names the stop token and decodes nothing.
    tok = types.SimpleNamespace(eos_token_id=cfg.eos_token_id, unk_token_id=None, chat_template=None,
                                convert_tokens_to_ids=lambda t: None, decode=lambda ids, **kw: "")
    return HFEngine("random-llama-3.1-8b-shape", model=model, tokenizer=tok, device=str(device),
                    dtype=str(dtype).removeprefix("torch."), decode="fast")


def model_costs(model) -> tuple[int, int]:
    """(bytes of weights a decode step reads, non-embedding parameters of a prefill without the lm_head)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = emb.data_ptr() == head.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    read = total - (0 if tied else emb.numel() * emb.element_size())
    params = sum(p.numel() for p in model.parameters()) - emb.numel() - (0 if tied else head.numel())
    return read, params


def prefill_flops(engine, params: int, n: int) -> float:
    cfg = engine.model.config
    return 2.0 * params * n + 2.0 * cfg.num_hidden_layers * cfg.num_attention_heads * engine.head_dim * n * n


def bare_forward_s(engine, ids: torch.Tensor, repeats: int = 1) -> float:
    """Fastest of ``repeats`` forwards of ``ids`` through plain transformers (SDPA, fresh DynamicCache, last
    logits only)."""
    from transformers import DynamicCache

    model, dev = engine.model, engine.device
    model.set_attn_implementation("sdpa")
    times = []
    try:
        with torch.inference_mode():
            for _ in range(repeats):
                cache = DynamicCache(config=model.config)
                _sync(dev)
                t0 = time.perf_counter()
                model(input_ids=ids, **{cache_kw(model): cache}, use_cache=True, logits_to_keep=1)
                _sync(dev)
                times.append(time.perf_counter() - t0)
                del cache
    finally:
        model.set_attn_implementation("scbench")
    return min(times)


def peak_bytes(engine) -> int:
    return engine.peak_memory()


def bench_cell(engine, name: str, knobs: dict, n: int, bare_s: float, bw: float, weight_bytes: int, params: int,
               decode_tokens: int, plain_tokens: int) -> dict:
    dev = engine.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    ids = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    method = METHODS.get(name)(**knobs)
    session = engine.session(method)
    fs = session.feed(ids, compress=True, sparse=False)
    prefill_s = fs.seconds - fs.compress_s
    kv_bytes = kvc.kv_nbytes(session.cache)
    bound = bw / (weight_bytes + kv_bytes)
    row = {"method": name, "knobs": knobs, "tokens": n, "prefill_s": prefill_s, "compress_s": fs.compress_s,
           "prefill_tflops": prefill_flops(engine, params, n) / prefill_s / 1e12, "bare_prefill_s": bare_s,
           "overhead": prefill_s / bare_s - 1, "kv_bytes": kv_bytes, "bound_tok_s": bound}
    logits, ckpt = session.last_logits, session.checkpoint(rewrites=False)
    plain = None
    if plain_tokens and name == "full":
        engine.decode_mode = "plain"
        plain = session.generate(plain_tokens)
        row["plain_tok_s"] = (len(plain.tokens) - 1) / plain.decode_s
        session.rollback(ckpt)
        session.last_logits = logits
    engine.decode_mode = "fast"
    gen = session.generate(decode_tokens)
    row["decode_path"] = gen.decode_path
    capture = session.decoder.capture_s if session.decoder is not None else 0.0
    steps = len(gen.tokens) - 1 - (1 if capture else 0)
    row["capture_s"] = capture
    row["fast_tok_s"] = steps / (gen.decode_s - capture) if steps > 0 else float("nan")
    row["fast_tokens"] = len(gen.tokens)
    row["frac_bound"] = row["fast_tok_s"] / bound
    if plain is not None:
        k = min(len(plain.tokens), len(gen.tokens))
        same = next((i for i in range(k) if plain.tokens[i] != gen.tokens[i]), k)
        row["same_tokens"], row["compared_tokens"] = same, k
    row["peak_mem_gib"] = peak_bytes(engine) / 2**30
    del session
    return row


def identity_check(dtype: torch.dtype, n: int, tokens: int) -> dict:
    """Greedy tokens of the plain loop vs the fast path from one prefill of ``n`` random tokens, full attention."""
    engine = random_llama_8b(torch.device("cuda"), dtype)
    engine.stop_ids = {-1}
    session = engine.session(METHODS.get("full")())
    session.feed(torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(1)).tolist(),
                 compress=False, sparse=False)
    logits, ckpt = session.last_logits, session.checkpoint(rewrites=False)
    engine.decode_mode = "plain"
    plain = session.generate(tokens).tokens
    session.rollback(ckpt)
    session.last_logits = logits
    engine.decode_mode = "fast"
    fast = session.generate(tokens)
    same = next((i for i in range(tokens) if plain[i] != fast.tokens[i]), tokens)
    return {"dtype": str(dtype), "prompt_tokens": n, "compared_tokens": tokens, "same_tokens": same,
            "decode_path": fast.decode_path}


def table(rows: list[dict]) -> str:
    head = ("| method | tokens | prefill s | TFLOP/s | overhead | KV MiB | decode path | tok/s | bound tok/s | "
            "frac | plain tok/s | same/compared | peak GiB |")
    out = [head, "|" + "---|" * 13]
    for r in rows:
        same = f"{r['same_tokens']}/{r['compared_tokens']}" if "same_tokens" in r else ""
        plain = f"{r['plain_tok_s']:.1f}" if "plain_tok_s" in r else ""
        out.append(f"| {r['method']} | {r['tokens']} | {r['prefill_s']:.3f} | {r['prefill_tflops']:.3g} | "
                   f"{100 * r['overhead']:+.1f}% | {r['kv_bytes'] / 2**20:.0f} | {r['decode_path']} | "
                   f"{r['fast_tok_s']:.1f} | {r['bound_tok_s']:.1f} | {100 * r['frac_bound']:.0f}% | {plain} | "
                   f"{same} | {r['peak_mem_gib']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="embedded model on the CPU (the default without CUDA)")
    ap.add_argument("--lengths", type=int, nargs="+")
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--decode-tokens", type=int)
    ap.add_argument("--plain-tokens", type=int, help="plain-loop tokens for the full-attention comparison")
    ap.add_argument("--fp32-check", type=int, default=64, help="GPU: tokens compared plain vs fast on a float32 "
                    "copy of the model (4K-token prompt); 0 skips")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    if cpu:
        from scbench.run import get_engine

        torch.set_num_threads(max(1, torch.get_num_threads()))
        engine = get_engine({"name": "smollm2-135m", "path": "embedded:smollm2", "device": "cpu", "decode": "fast"})
        lengths, methods = args.lengths or [512, 1024], args.methods or list(CPU_METHODS)
        knobs, decode_tokens, plain_tokens = CPU_METHODS, args.decode_tokens or 32, args.plain_tokens or 32
        copy_bytes = 1 << 28
    else:
        engine = random_llama_8b(torch.device("cuda"))
        lengths, methods = args.lengths or [8192, 32768, 65536, 131072], args.methods or list(GPU_METHODS)
        knobs, decode_tokens, plain_tokens = GPU_METHODS, args.decode_tokens or 128, args.plain_tokens or 32
        copy_bytes = 1 << 31
    engine.stop_ids = {-1}  # random weights: decode the whole budget, never stop early
    bw = copy_bandwidth(engine.device, copy_bytes)
    weight_bytes, params = model_costs(engine.model)
    print(f"device {engine.describe()['device_name']}: copy bandwidth {bw / 1e9:.0f} GB/s, weights read per "
          f"decode step {weight_bytes / 2**30:.2f} GiB, decode attention {fastdecode.KERNEL if not cpu else 'torch'}",
          flush=True)
    warm = torch.randint(0, 1000, (1, 256), device=engine.device)
    bare_forward_s(engine, warm)
    rows = []
    for n in lengths:
        ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n)).to(engine.device)
        bare = bare_forward_s(engine, ids, repeats=2)
        del ids
        for name in methods:
            try:
                row = bench_cell(engine, name, knobs.get(name, {}), n, bare, bw, weight_bytes, params,
                                 decode_tokens, plain_tokens)
            except torch.OutOfMemoryError as e:
                row = None
                print(f"{name} @ {n}: out of memory ({str(e).splitlines()[0]})", flush=True)
            if row is not None:
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(table(rows))
    info = engine.describe()
    checks = []
    if not cpu and args.fp32_check:  # the same comparison without bf16 rounding: any difference is a bug
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        checks.append(identity_check(torch.float32, 4096, args.fp32_check))
        print(json.dumps(checks[-1]), flush=True)
    result = {"device": info["device_name"], "model": info["model"], "dtype": info["dtype"],
              "torch": torch.__version__, "python": platform.python_version(), "copy_bandwidth_Bps": bw,
              "decode_attention": fastdecode.KERNEL if not cpu else "torch", "weight_bytes_per_step": weight_bytes,
              "decode_tokens": decode_tokens, "rows": rows,
              "identity_checks": checks,
              "table": table(rows)}
    out = args.out or Path("results/perf") / f"decode_{'cpu' if cpu else 'gpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
