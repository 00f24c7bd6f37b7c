"""Where DuoAttention's prefill attention time goes, layer by layer, at the 8B shape (GPU, ~1 min).

    python scripts/probe_duo_prefill.py [--lengths 32768 131072] [--out FILE]
                                        [--heads results/perf/duo_heads_llama-3.1-8b_timing.json]

Through ``scbench run`` at 32K the split prefill (b8c267b) takes 1.55-1.62 s against dense's 1.40 and A-shape's
1.08 (results/perf/duo_split_prefill_h200.md), where the two others' figures predict ~1.24 s. Per length, over the
32 layers of the timing gates (each layer its own count of retrieval heads), it times with CUDA events: the whole
hook (``DuoAttention.prefill_attention``), dense SDPA over every head, SDPA over each layer's retrieval heads by
backend (default, cuDNN, flash), the band's FlexAttention over every head with the retrieval heads listed with no
block, the same band over every head (A-shape), the block mask's build, and the gathers (index_select of the
retrieval heads, index_copy_ back). The parts that add up past the hook's ideal (dense / 2 + band / 2) name the
overhead. Prints one JSON line per measurement and writes them to ``--out``. Written without a GPU at hand
(session 21, device time spent): its first run is the next GPU session's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sparse_prefill  # noqa: E402

HQ, HKV, D = 32, 8, 128


def timed(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median milliseconds over CUDA events after warm-up calls (``bench_sparse_prefill.timed``)."""
    return bench_sparse_prefill.timed(fn, repeats, warmup)


def layers_of(duo, fn) -> float:
    """fn(layer) summed over the model's 32 layers, each timed alone (ms)."""
    return sum(timed(lambda: fn(layer)) for layer in range(duo._retrieval.shape[0]))


def backend_ms(q, k, v, scale, backend) -> float | None:
    """SDPA causal over these heads on one backend; None where it does not take them."""
    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    try:
        return timed(run)
    except RuntimeError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", default="results/perf/duo_heads_llama-3.1-8b_timing.json")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from scbench.kernels import flex
    from scbench.kernels import pattern as pat
    from scbench.methods import duo_attention as duo_mod
    from scbench.methods.ashape import _band_block_mask

    duo = duo_mod.DuoAttention(heads=args.heads)
    dev, scale, rows = torch.device("cuda"), D**-0.5, []
    rep = HQ // HKV

    def row(t, what, ms, **extra):
        r = {"tokens": t, "what": what, "ms": None if ms is None else round(ms, 3), **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)

    for t in args.lengths:
        g = torch.Generator(device=dev).manual_seed(t)
        q = torch.randn(1, t, HQ, D, generator=g, device=dev, dtype=torch.bfloat16).transpose(1, 2)  # HF's layout
        k = torch.randn(1, HKV, t, D, generator=g, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, HKV, t, D, generator=g, device=dev, dtype=torch.bfloat16)
        band = pat.band(t, t, duo.n_init, duo.n_local, 0, dev)
        counts = [int(duo.retrieval(layer, HKV).sum()) for layer in range(duo._retrieval.shape[0])]
        with torch.inference_mode():
            def subset(layer):
                kv = duo.retrieval(layer, HKV).nonzero().flatten().tolist()
                qi = torch.tensor([h * rep + j for h in kv for j in range(rep)], device=dev)
                ki = torch.tensor(kv, device=dev)
                return qi, q.index_select(1, qi), k.index_select(1, ki), v.index_select(1, ki)

            parts = {layer: subset(layer) for layer in range(len(counts)) if 0 < counts[layer]}

            def sdpa(p):
                return F.scaled_dot_product_attention(p[1], p[2], p[3], is_causal=True, scale=scale, enable_gqa=True)

            first = timed(  # before anything else met these shapes: cuDNN's plans
                lambda: [sdpa(p) for p in parts.values()], repeats=1, warmup=0)
            row(t, "hook (DuoAttention.prefill_attention, 32 layers)",
                layers_of(duo, lambda layer: duo.prefill_attention(layer, q, k, v, scale)),
                retrieval_kv_heads_per_layer=counts)
            dense = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                 enable_gqa=True))
            row(t, "dense SDPA, every head, one layer", dense, x32=round(32 * dense, 1))
            bm = _band_block_mask(t, t, duo.n_init, duo.n_local, 0, dev)
            ashape = timed(lambda: flex.attention(q, k, v, band, scale, bm))
            row(t, "A-shape band, every head, one layer", ashape, x32=round(32 * ashape, 1))
            row(t, "ideal: 32 x (dense + band) / 2", 16 * (dense + ashape))

            row(t, "SDPA over the retrieval heads, default backend, 32 layers",
                sum(timed(lambda p=p: sdpa(p)) for p in parts.values()), first_call_ms=round(first, 1))
            for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                                  ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                per = [backend_ms(qs, ks, vs, scale, backend) for _, qs, ks, vs in parts.values()]
                row(t, f"SDPA over the retrieval heads, {name}, 32 layers",
                    None if None in per else sum(per), layers=len(per))

            def per_kv_head(layer):  # one SDPA shape per length whatever the layer's count of retrieval heads
                out = torch.empty_like(q)
                for h in duo.retrieval(layer, HKV).nonzero().flatten().tolist():
                    out[:, h * rep : (h + 1) * rep] = F.scaled_dot_product_attention(
                        q[:, h * rep : (h + 1) * rep], k[:, h : h + 1], v[:, h : h + 1], is_causal=True, scale=scale,
                        enable_gqa=True)
                return out

            first = timed(lambda: [per_kv_head(layer) for layer in parts], repeats=1, warmup=0)
            row(t, "SDPA per retrieval KV head (one shape), default backend, 32 layers",
                sum(timed(lambda layer=layer: per_kv_head(layer)) for layer in parts), first_call_ms=round(first, 1))

            def gathers(layer):
                qi, qs, _, _ = subset(layer)
                return torch.empty_like(q).index_copy_(1, qi, qs)

            row(t, "gathers: index_select of q, k, v + index_copy_ back, 32 layers",
                sum(timed(lambda layer=layer: gathers(layer)) for layer in parts))
            masks = {layer: duo_mod._streaming_block_mask(t, t, duo.n_init, duo.n_local,
                                                          ~duo.retrieval(layer, HKV).repeat_interleave(rep), dev)
                     for layer in range(len(counts))}
            row(t, "block masks of the streaming heads, 32 layers",
                layers_of(duo, lambda layer: duo_mod._streaming_block_mask(
                    t, t, duo.n_init, duo.n_local, ~duo.retrieval(layer, HKV).repeat_interleave(rep), dev)))
            row(t, "band over every head, retrieval heads with no block, 32 layers",
                layers_of(duo, lambda layer: flex.attention(q, k, v, band, scale, masks[layer])))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
