"""First prefill (with its compression) and a later turn's prefill per method, on a random Llama: where KVzip's
reconstruction scoring and the ragged caches' (AdaKV, KVzip) later turns spend their time.

    python scripts/profile_kvzip.py [--tokens 4096] [--methods full,snapkv,adakv,kvzip] [--device cpu]
        [--shape tiny|llama8b] [--layers 4] [--tokenizer DIR] [--profile] [--warmup] [--decode N] [--out FILE]

tiny: hidden 512, 8 query / 2 KV heads (head_dim 64), float32 (a CPU in seconds); llama8b: hidden 4096, 32 / 8
heads, head_dim 128, bfloat16 (CUDA). Budget 512 (tiny) / 4,096 (llama8b) tokens per KV head, KVzip chunks of 1,024
/ 2,048; the later turn feeds 64 tokens over the compressed cache. ``--profile``: torch.profiler's op table of the
first feed (KVzip: its reconstruction forwards and scoring) and of the later feed. Prints one JSON row per method.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = {"tiny": dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2),
          "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)}


def engine_for(args):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from scbench.engines.hf import HFEngine

    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from support import byte_tokenizer

        tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=args.layers, max_position_embeddings=args.tokens + 8192,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **SHAPES[args.shape])
    dtype = "float32" if args.shape == "tiny" else "bfloat16"
    with torch.device(args.device):  # random weights made where they run (an 8B shape on a CPU takes seconds)
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    engine = HFEngine("random-llama", name="random-llama", model=model, tokenizer=tok, device=args.device, dtype=dtype)
    engine.decode_mode = "plain" if args.device == "cpu" else "auto"  # CUDA: the graph path, as runs take it
    return engine, min(len(tok), 30000)


def duo_gates(layers: int, kv: int) -> str:
    """A timing-only DuoAttention gates file: in every layer the first half of the KV heads are retrieval heads."""
    import tempfile

    path = Path(tempfile.mkdtemp()) / "duo_gates.json"
    path.write_text(json.dumps({"gates": [[1.0] * (kv // 2) + [0.0] * (kv - kv // 2)] * layers}))
    return str(path)


def timed(engine, fn, profile: bool):
    from scbench.devices import sync

    prof = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as make

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
        prof = make(activities=acts)
        prof.__enter__()
    sync(engine.device)
    t0 = time.perf_counter()
    out = fn()
    sync(engine.device)
    seconds = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15), file=sys.stderr)
    return out, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--methods", default="full,snapkv,adakv,kvzip")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--warmup", action="store_true", help="each method once on a 2,048-token prompt first (kernel "
                    "compiles, cuDNN plans of the short shapes) so that the timed feeds hold none")
    ap.add_argument("--decode", type=int, default=4, help="tokens generated after the first feed (decode_tok_s: "
                    "graph capture excluded, as the runner records it)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from scbench.registry import METHODS

    engine, vocab = engine_for(args)
    big = args.shape == "llama8b"
    cfgs = {"full": {}, "snapkv": {"budget": 4096 if big else 512}, "adakv": {"budget": 4096 if big else 512},
            "kvzip": {"budget": 4096 if big else 512, "chunk": 2048 if big else 1024},
            "duo_attention": {"heads": duo_gates(args.layers, SHAPES[args.shape]["num_key_value_heads"]), "retrieval_ratio": 0.5, "n_init": 128 if big else 4,
                              "n_local": 3968 if big else 252}}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.tokens,), generator=gen).tolist()
    later = torch.randint(0, vocab, (64,), generator=gen).tolist()
    rows = []
    for name in args.methods.split(","):
        method = METHODS.get(name)(**cfgs[name])
        warm_s = engine.warmup(method, lengths=(2048,), force=True) if args.warmup else 0.0
        session = engine.session(method)
        st, first_s = timed(engine, lambda: session.feed(ids, compress=True, sparse=True), args.profile)
        out = session.generate(args.decode)
        costs = method.take_costs(session)
        _, later_s = timed(engine, lambda: session.feed(later, compress=False, sparse=False), args.profile)
        rows.append({"method": name, "tokens": args.tokens, "device": args.device, "shape": args.shape,
                     "first_prefill_s": round(first_s, 4), "compress_s": round(st.compress_s, 4),
                     "later_prefill_s": round(later_s, 4), "kv_bytes": session.memory()["kv_bytes"],
                     "decode_tok_s": round(len(out.tokens) / max(out.decode_s, 1e-9), 1), "decode_path": out.decode_path,
                     "warmup_s": round(warm_s, 3), "decode_capture_s": round(out.warmup_s, 3),
                     **{k: round(v, 4) if isinstance(v, float) else v for k, v in costs.items()}})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
