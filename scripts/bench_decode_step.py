"""Full attention's decode step, fused (scbench/engines/fuse.py) against unfused: step time, launches, % of bound.

    python scripts/bench_decode_step.py --tokenizer DIR --lengths 32000 131072 --out F.json

Builds the random Llama-3.1-8B-shaped bf16 model in memory, prefills each length (random tokens), then per
variant (unfused, fused): one eager step under ``torch.profiler`` (CUDA kernels launched per step and their time),
and a graph-replayed decode (``FastDecoder.generate``: warm-up + capture reported apart as ``warmup_s``, then
``--steps`` timed steps). The bound is (weight bytes + the KV bytes one step reads) / ``--tbps``. Greedy tokens
of the two variants are compared (bf16: equal until they first differ, a GEMM order effect). Stops starting a
new length once ``--budget`` seconds have gone.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch
from torch.autograd import DeviceType

from scbench.engines import fastdecode, fuse
from scbench.engines.base import cache_kw
from scbench.engines.hf import HFEngine
from scbench.run import build_method

DEV = torch.device("cuda")
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)


class Fresh:
    """The prefilled cache as it was: every generate starts from it (generate leaves its tokens in the cache)."""

    def __init__(self, cache):
        self.cache, self.kv = cache, [(layer.keys, layer.values) for layer in cache.layers]

    def __call__(self):
        for layer, (k, v) in zip(self.cache.layers, self.kv):
            layer.keys, layer.values = k, v
        return self.cache


def profile_step(model, fresh, pos, first, fused):
    from torch.profiler import ProfilerActivity, profile

    dec = fastdecode.FastDecoder(model, DEV, use_graph=False, fused=fused)
    dec.generate(fresh(), pos, first, 3, set())  # compile + warm
    steps = 4
    with profile(activities=[ProfilerActivity.CUDA if DEV.type == "cuda" else ProfilerActivity.CPU]) as prof:
        dec.generate(fresh(), pos, first, steps + 1, set())
        sync()
    kinds = Counter()
    total_us = 0.0
    for e in prof.key_averages():
        if DEV.type == "cuda" and getattr(e, "device_type", None) != DeviceType.CUDA:
            continue  # the runtime's launch calls (cudaLaunchKernel, cuLaunchKernelEx, ...), not kernels
        kinds[e.key[:70]] += e.count
        total_us += e.self_device_time_total if DEV.type == "cuda" else 0.0
    launches = sum(kinds.values()) / steps
    return {"launches_per_step": launches, "kernel_ms_per_step": total_us / steps / 1000,
            "top": [(k, c / steps) for k, c in kinds.most_common(12)]}


def graph_decode(model, fresh, pos, first, fused, steps):
    dec = fastdecode.FastDecoder(model, DEV, use_graph=DEV.type == "cuda", fused=fused)
    t0 = time.perf_counter()
    dec.generate(fresh(), pos, first, steps + 1, set())
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    toks = dec.generate(fresh(), pos, first, steps + 1, set())
    sync()
    step_ms = (time.perf_counter() - t0) / (len(toks) - 1) * 1000
    return {"step_ms": step_ms, "first_generate_s": warm, "warmup_s": dec.capture_s}, toks


@torch.inference_mode()
def step_logits(model, fresh, pos, first, fused):
    """One step's logits (float32 [V]) from the prefilled cache: the plain forward (fused None) or the static one."""
    if fused is None:
        out = model(input_ids=torch.tensor([[first]], device=DEV), position_ids=torch.tensor([[pos]], device=DEV),
                    **{cache_kw(model): fresh()}, use_cache=True, logits_to_keep=1).logits
        fresh()  # the forward appended to the cache's layers: put the prefilled tensors back
        return out[0, -1].float()
    dec = fastdecode.FastDecoder(model, DEV, use_graph=False, fused=fused)
    dec._prepare(fresh(), 2)
    dec.tok.fill_(first)
    dec.pos.fill_(pos)
    return dec._logits()[0, -1].float()


def agreement(a, b):
    d = (a - b).abs().max().item()
    return {"max_abs_diff": d, "rel_to_std": d / a.std().item(), "argmax_equal": bool(a.argmax() == b.argmax())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32000])
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--tbps", type=float, default=4.0)
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--split-kv", nargs="*", default=[],
                    help="extra fused variants, each a JSON update of fastdecode.SPLIT_KV (graph timing only)")
    ap.add_argument("--tokenizer")
    ap.add_argument("--preset", default="llama-3.1-8b", help="random:<preset> (tiny-llama + --device cpu: a dry run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    a = ap.parse_args()
    t_start = time.perf_counter()
    eng = HFEngine(f"random:{a.preset}", tokenizer_path=a.tokenizer, device=a.device)
    global DEV
    DEV = eng.device
    model, cfg = eng.model, eng.model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    read = weights - embed.numel() * embed.element_size()  # one embedding row is read per step
    report = {"device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", "torch": torch.__version__, "weights_GB": weights / 1e9,
              "weights_read_GB": read / 1e9, "tbps": a.tbps, "build_s": time.perf_counter() - t_start, "runs": {}}
    t0 = time.perf_counter()
    report["plan"] = fuse.prepare(model).fused_count()
    report["prepare_s"] = time.perf_counter() - t0
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    for length in a.lengths:
        if time.perf_counter() - t_start > a.budget:
            print(f"skip {length}: budget spent", flush=True)
            continue
        ids = torch.randint(0, 40000, (length,), generator=torch.Generator().manual_seed(0)).tolist()
        s = eng.session(build_method({"name": "full"}))
        t0 = time.perf_counter()
        s.feed(ids, compress=True, sparse=False)
        first = int(s.last_logits.argmax())
        fresh = Fresh(s.cache)
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (length + a.steps // 2) * \
            (cfg.hidden_size // cfg.num_attention_heads) * embed.element_size()
        bound_ms = (read + kv) / (a.tbps * 1e12) * 1000
        run = {"prefill_s": time.perf_counter() - t0, "kv_GB": kv / 1e9, "bound_ms": bound_ms}
        logits = {name: step_logits(model, fresh, s.pos, first, f)
                  for name, f in (("plain", None), ("unfused", False), ("fused", True))}
        run["logits_plain_vs_unfused"] = agreement(logits["plain"], logits["unfused"])
        run["logits_unfused_vs_fused"] = agreement(logits["unfused"], logits["fused"])
        print(f"{length} one-step logits: plain vs unfused static {run['logits_plain_vs_unfused']}; "
              f"unfused vs fused {run['logits_unfused_vs_fused']}", flush=True)
        del logits
        toks = {}
        for fused in (False, True):
            name = "fused" if fused else "unfused"
            r = profile_step(model, fresh, s.pos, first, fused)
            g, toks[name] = graph_decode(model, fresh, s.pos, first, fused, a.steps)
            r.update(g)
            r["pct_of_bound"] = 100 * bound_ms / r["step_ms"]
            run[name] = r
            print(f"{length} {name}: graph step {r['step_ms']:.3f} ms ({r['pct_of_bound']:.1f}% of {bound_ms:.2f} ms "
                  f"bound), {r['launches_per_step']:.0f} launches/step, kernels {r['kernel_ms_per_step']:.3f} ms, "
                  f"warmup {r['warmup_s']:.2f} s", flush=True)
            for k, c in r["top"]:
                print(f"    x{c:6.1f} {k}")
            torch.cuda.empty_cache()
        default = dict(fastdecode.SPLIT_KV)
        for tune in a.split_kv:
            fastdecode.SPLIT_KV.update(json.loads(tune))
            try:
                g, t = graph_decode(model, fresh, s.pos, first, True, a.steps)
            finally:
                fastdecode.SPLIT_KV.clear()
                fastdecode.SPLIT_KV.update(default)
            g["pct_of_bound"] = 100 * bound_ms / g["step_ms"]
            g["tokens_equal_fused"] = t == toks["fused"]
            run[f"fused {tune}"] = g
            print(f"{length} fused {tune}: graph step {g['step_ms']:.3f} ms ({g['pct_of_bound']:.1f}%), "
                  f"tokens equal: {g['tokens_equal_fused']}", flush=True)
        same = next((i for i, (x, y) in enumerate(zip(toks["unfused"], toks["fused"])) if x != y), len(toks["fused"]))
        run["tokens_equal_prefix"] = same
        run["tokens_compared"] = len(toks["fused"])
        print(f"{length}: greedy tokens equal for the first {same} of {len(toks['fused'])}", flush=True)
        report["runs"][str(length)] = run
        del s, fresh
        torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - t_start
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
