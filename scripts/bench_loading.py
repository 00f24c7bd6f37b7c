"""GPU benchmark of the loading methods (Quest, RetrievalAttention) against full attention, through HFEngine.

A Llama-3.1-8B-shaped model with random bf16 weights (no hub) prefills a context of ``--ctx`` random tokens once
per method, then greedily decodes ``--new`` tokens through the engine's own loop. Per method it records decode
tokens/s, bytes loaded per decode token (from the tier counters), KV bytes on the accelerator and in host memory,
and accelerator memory (allocated after the prefill, peak during decode). The fast-decode row's CUDA-graph capture (one-time per
turn) is recorded apart and left out of its tokens/s (``decode_tok_s_incl_capture`` keeps it in). ``--cpu`` runs a tiny config on the CPU
(a smoke test of the script). Writes JSON after every method, so a cut-off run keeps what it measured.

    python scripts/bench_loading.py --out results/perf/loading_h100.json          # H100: 32K, 8B shape
    python scripts/bench_loading.py --cpu --out /tmp/loading_cpu.json              # CPU smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

METHODS = [  # (label, method config, engine decode mode)
    ("full (plain loop)", {"name": "full"}, "plain"),
    ("full (fast decode)", {"name": "full"}, "auto"),
    ("quest 4096 head", {"name": "quest", "budget": 4096}, "plain"),
    ("quest 4096 group", {"name": "quest", "budget": 4096, "gqa": "group"}, "plain"),
    ("quest-ref 1024 head", {"name": "quest", "budget": 1024}, "plain"),
    ("quest 4096 group, KV on host", {"name": "quest", "budget": 4096, "gqa": "group", "tier": "cpu"}, "plain"),
    ("retrieval_attention 4096 group", {"name": "retrieval_attention", "top_k": 4096, "gqa": "group"}, "plain"),
    ("retrieval_attention 4096 head", {"name": "retrieval_attention", "top_k": 4096}, "plain"),
]


def tokenizer(vocab: int):
    """A word-level tokenizer whose only special token is an EOS at the last id (the run never stops on it)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=f"t{vocab - 1}", unk_token="t0")


def build_engine(cpu: bool, decode: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from scbench.engines.hf import HFEngine

    if cpu:
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=32, vocab_size=1000)
    else:
        shape = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256)
    cfg = LlamaConfig(**shape, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False)
    dev = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with dev:
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    engine = HFEngine("random-llama-3.1-8b-shape", model=model, tokenizer=tokenizer(cfg.vocab_size),
                      device=str(dev), dtype="float32" if cpu else "bfloat16", decode=decode)
    engine.stop_ids = {-1}  # decode exactly --new tokens
    return engine


def measure(engine, label: str, cfg: dict, ctx: int, new: int) -> dict:
    from scbench.registry import METHODS

    method = METHODS.get(cfg["name"])(**{k: v for k, v in cfg.items() if k != "name"})
    dev = engine.device
    vocab = engine.model.config.vocab_size
    prompt = torch.randint(0, vocab - 1, (ctx,), generator=torch.Generator().manual_seed(1)).tolist()
    session = engine.session(method)
    fs = session.feed(prompt, compress=True, sparse=False)
    session.memory()  # zero the load counters: the prefill is not decode
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    after_prefill = torch.cuda.memory_allocated() if cuda else None
    gen = session.generate(new)
    mem = session.memory()
    steps = len(gen.tokens) - 1
    capture_s = getattr(getattr(session, "decoder", None), "capture_s", 0.0)  # CUDA-graph capture (fast decode)
    row = {
        "label": label, "method": method.label(), "decode_path": getattr(gen, "decode_path", "plain"),
        "context_tokens": ctx, "decode_tokens": steps, "prefill_s": round(fs.seconds, 3),
        "offload_s": round(fs.compress_s, 3),
        # steady state: the capture (which also runs one real step) is left out
        "decode_tok_s": round((steps - 1) / (gen.decode_s - capture_s), 2) if capture_s else round(steps / gen.decode_s, 2),
        "decode_tok_s_incl_capture": round(steps / gen.decode_s, 2), "graph_capture_s": round(capture_s, 3),
        "loaded_bytes_per_token": mem["loaded_bytes"] // steps,
        "load_s_per_token": round(mem["load_s"] / steps, 5),
        "kv_bytes_on_accelerator": mem["kv_bytes"], "kv_bytes_in_host_memory": mem["slow_tier_bytes"],
        "kv_full_bytes": mem["kv_full_bytes"],
        "accelerator_allocated_after_prefill": after_prefill,
        "accelerator_peak_during_decode": torch.cuda.max_memory_allocated() if cuda else None,
    }
    del session
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--cpu", action="store_true", help="tiny config on the CPU (smoke test)")
    ap.add_argument("--only", default=None, help="comma-separated labels prefixes to run")
    ap.add_argument("--out", default="results/perf/loading_h100.json")
    args = ap.parse_args()
    if args.cpu:
        args.ctx = min(args.ctx, 2048)
    t0 = time.time()
    out = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
           "model": "Llama-3.1-8B shape, random weights" + (" (tiny on CPU)" if args.cpu else ", bf16"),
           "rows": []}
    engines = {}
    for label, cfg, decode in METHODS:
        if args.only and not any(label.startswith(p) for p in args.only.split(",")):
            continue
        if not engines:
            engines["model"] = build_engine(args.cpu, decode)
            out["model_build_s"] = round(time.time() - t0, 1)
        engine = engines["model"]
        engine.decode_mode = decode
        try:
            row = measure(engine, label, cfg, args.ctx, args.new)
        except Exception as e:  # noqa: BLE001 - keep the other rows
            row = {"label": label, "error": f"{type(e).__name__}: {e}"}
        out["rows"].append(row)
        out["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
