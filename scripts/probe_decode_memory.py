"""Memory of a conversation's cache across turns: how far above the cache itself each turn's decode (and later
prefill) goes, with the fast decoder's buffers as the session cache's storage (``SCBENCH_DECODE_ADOPT=1``, the
default) and as a copy beside it (``0``: the behaviour before). Full attention, one session through the engine's
own feed / generate / drop_last (multi-turn) or checkpoint / rollback (multi-request), random weights.

Per turn, as shares of the cache's own bytes: the peak above what the model and the prefilled cache held (allocated
bytes on CUDA, the process's peak RSS on CPU; the peak restarts at each turn) and what stays held after the turn.
Before, a first decode made buffers beside the prefilled cache (+1x), a crop copied the cache out of them and a later
prefill concatenated a new copy (+1x held from then on); now both stay near the buffers' room.

    python3 -P scripts/probe_decode_memory.py --device cuda --tokens 131072 --layers 8 \
        --out results/perf/decode_memory_h200.json          # Llama-3.1-8B's layer shape, bf16
    python3 -P scripts/probe_decode_memory.py --device cpu --tokens 8192 --layers 4 \
        --out results/perf/decode_memory_cpu.json           # the mechanism on a CPU (float32, a narrow model)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from scbench import devices
from scbench.engines import fastdecode
from scbench.kv import cache as kvc
from scbench.registry import METHODS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import byte_tokenizer  # noqa: E402 (the tests' byte-level tokenizer: no download)


def engine_for(device: str, layers: int, window: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from scbench.engines.hf import HFEngine

    cuda = device == "cuda"
    shape = (dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336) if cuda
             else dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1024))
    tok = byte_tokenizer()
    dtype = torch.bfloat16 if cuda else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), num_hidden_layers=layers,
                                                 max_position_embeddings=window, rope_theta=500000.0, **shape))
    finally:
        torch.set_default_dtype(default)
    return HFEngine(path="unused", model=model.eval(), tokenizer=tok, device=device,
                    dtype="bfloat16" if cuda else "float32")


def resident(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else devices.peak_rss()


def conversation(engine, device: str, mode: str, tokens: int, turns: int, prompt: int, new: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (tokens,), generator=g).tolist()
    s = engine.session(METHODS.get("full")())
    s.feed(ids, compress=False, sparse=False)
    kv = kvc.kv_nbytes(s.cache)
    devices.sync(device)
    held = resident(device)  # the model and the prefilled cache
    checkpoint = s.checkpoint(rewrites=False) if mode == "multi_request" else None
    rows = []
    for i in range(turns):
        if i and checkpoint is not None:
            s.rollback(checkpoint)
        devices.sync(device)
        devices.start_peak([torch.device(device)])
        t0 = time.perf_counter()
        if i:
            s.feed(torch.randint(0, 256, (prompt,), generator=g).tolist(), compress=False, sparse=False)
        gen = s.generate(new)
        if checkpoint is None:
            s.drop_last(len(gen.tokens) - 1)
        devices.sync(device)
        extra, kept = peak(device) - held, resident(device) - held
        rows.append({"turn": i, "extra_peak_bytes": extra, "extra_vs_kv": round(extra / kv, 3),
                     "kept_bytes": kept, "kept_vs_kv": round(kept / kv, 3),
                     "seconds": round(time.perf_counter() - t0, 3), "decode_path": gen.decode_path})
    out = {"mode": mode, "adopt": fastdecode.ADOPT, "kv_bytes": kv, "allocations": s.decoder.allocations,
           "turns": rows}
    del s
    devices.free_cached_memory()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=200, help="tokens of each later turn's prompt")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engine = engine_for(args.device, args.layers, args.tokens + 4096)
    engine.decode_mode = "fast"
    results = []
    for adopt in (False, True):
        fastdecode.ADOPT = adopt
        for mode in ("multi_turn", "multi_request"):
            results.append(conversation(engine, args.device, mode, args.tokens, args.turns, args.prompt, args.new))
    fastdecode.ADOPT = os.environ.get("SCBENCH_DECODE_ADOPT", "1") != "0"
    print("| mode | buffers | KV MiB | allocations | peak above the cache, per turn (x the cache) | held after it | "
          "seconds per turn |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {'the storage' if r['adopt'] else 'a copy'} | {r['kv_bytes'] / 2**20:.0f} | "
              f"{r['allocations']} | {', '.join(str(t['extra_vs_kv']) for t in r['turns'])} | "
              f"{', '.join(str(t['kept_vs_kv']) for t in r['turns'])} | "
              f"{', '.join(str(t['seconds']) for t in r['turns'])} |")
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
                "commit": os.environ.get("SCBENCH_COMMIT", ""), "args": vars(args)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
