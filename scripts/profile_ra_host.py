"""Where RetrievalAttention's host-tier decode step goes (methods/retrieval_host.py), on the GPU box: a
Llama-3.1-8B-shaped random bf16 model, ``--ctx`` random tokens prefilled with RetrievalAttention (tier=cpu,
top_k=4096), then ``--warm`` decode tokens untimed and ``--tokens`` timed, first plain (tok/s), then under
torch.profiler with each part of the split step wrapped in a named range: the new token's append to the host tier
(``TieredLayer.update``), the device window's rows, the device half (``partial_attention``), the wait for the query
on the host (``Event.synchronize``), the host half (``host_partial``: the C kernel), the merge, and the whole
``split_decode``. Prints per-token milliseconds of each range and the top CPU / CUDA ops, one JSON object per line.

    TOK=.gpuwhl/smol_tok python scripts/profile_ra_host.py [--ctx 32768] [--tokens 8]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch

T0 = time.perf_counter()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def log(**kw) -> None:
    kw["t"] = round(time.perf_counter() - T0, 1)
    print(json.dumps(kw), flush=True)


def wrap(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def inner(*a, **kw):
        with torch.profiler.record_function(label):
            return fn(*a, **kw)

    setattr(owner, name, inner)


def later_ab(s, ckpt, rounds: int, tokens: int) -> None:
    """Multi-request turns (rollback to the context, a 64-token prompt prefilled densely over the host rows, decode)
    with the block-wise host-to-device load and with the old one, alternating, same process and box."""
    from scbench.kv import offload

    new = offload.Rows.to_device

    def old(self, device, start=0, end=None):
        self.settle()
        return self.buf[..., start: self.n if end is None else end, :].to(device)

    g = torch.Generator().manual_seed(1)
    for r in range(rounds):
        for name, fn in (("blocks", new), ("view_to", old)):
            offload.Rows.to_device = fn
            s.rollback(ckpt)
            ids = torch.randint(100, 40000, (64,), generator=g).tolist()
            fs = s.feed(ids, compress=False, sparse=False)
            gen = s.generate(tokens)
            steps = max(1, len(gen.tokens) - 1)
            log(round=r, load=name, later_prefill_s=round(fs.seconds, 3), tok_s=round(steps / gen.decode_s, 3))
    offload.Rows.to_device = new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=4096)
    ap.add_argument("--later", type=int, default=0,
                    help="then A/B in this process: rounds of (rollback, a later prefill of 64 tokens, --tokens decoded) "
                         "with Rows.to_device as it is and as it was (view.to: a pageable host temporary); no profile")
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    from scbench.engines.hf import HFEngine
    from scbench.kv import offload, split
    from scbench.methods import retrieval_host
    from scbench.methods.retrieval_attention import RetrievalAttention

    log(torch=torch.__version__, threads=torch.get_num_threads(),
        device=torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu")
    engine = HFEngine(os.environ.get("MODEL", "random:llama-3.1-8b"), tokenizer_path=os.environ.get("TOK"), device=DEV,
                      dtype="bfloat16")
    m = RetrievalAttention(top_k=a.top_k)
    s = engine.session(m)
    ids = torch.randint(100, 40000, (a.ctx,), generator=torch.Generator().manual_seed(a.ctx)).tolist()
    fs = s.feed(ids, compress=True, sparse=False)
    log(ctx=a.ctx, prefill_s=round(fs.seconds, 2), compress_s=round(fs.compress_s, 2))
    logits, ckpt = s.last_logits, s.checkpoint(rewrites=False)

    def again():
        s.rollback(ckpt)
        s.last_logits = logits

    s.generate(a.warm)
    again()
    gen = s.generate(a.tokens)
    again()
    steps = max(1, len(gen.tokens) - 1)
    log(plain_tok_s=round(steps / gen.decode_s, 3), ms_per_token=round(gen.decode_s / steps * 1e3, 1))
    if a.later:
        later_ab(s, ckpt, a.later, a.tokens)
        return
    wrap(offload.TieredLayer, "update", "ra.append_to_host")
    wrap(split.DeviceWindow, "rows", "ra.window_rows")
    wrap(retrieval_host, "partial_attention", "ra.device_half")
    wrap(retrieval_host, "host_partial", "ra.host_half")
    wrap(retrieval_host, "merge", "ra.merge")
    wrap(retrieval_host, "split_decode", "ra.split_decode")
    wrap(torch.cuda.Event, "synchronize", "ra.wait_query")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t0 = time.perf_counter()
        gen = s.generate(a.tokens)
        wall = time.perf_counter() - t0
    steps = max(1, len(gen.tokens) - 1)
    ev = p.key_averages()
    per = {e.key: round(e.cpu_time_total / 1e3 / steps, 2) for e in ev if e.key.startswith("ra.")}
    log(profiled_ms_per_token=round(wall / steps * 1e3, 1), ranges_cpu_ms_per_token=per,
        counts_per_token={e.key: round(e.count / steps, 1) for e in ev if e.key.startswith("ra.")})
    top_cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:25]
    log(top_self_cpu_ms_per_token={e.key: round(e.self_cpu_time_total / 1e3 / steps, 2) for e in top_cpu})
    top_cuda = sorted(ev, key=lambda e: -e.self_device_time_total)[:15]
    log(top_self_cuda_ms_per_token={e.key: round(e.self_device_time_total / 1e3 / steps, 3) for e in top_cuda})


if __name__ == "__main__":
    main()
