"""Time Llama-3.1-8B-shaped prefill on a GPU at 16K-128K tokens: dense causal SDPA vs each sparse method's fast
path (FlexAttention), one attention layer (default) or the whole random-weight model (``--model``).

    python scripts/bench_sparse_prefill.py [--lengths 16384 32768 65536 131072] [--compile auto|static] [--out F]
    python scripts/bench_sparse_prefill.py --model [--lengths ...] [--out F]

Per length and method: median milliseconds over --repeats timed runs (CUDA events, after warm-up/compilation),
speed-up vs dense SDPA, pattern density (fraction of causal score cells computed) and block density (fraction
of causal 128x128 blocks FlexAttention visits). A-shape / Tri-shape: ``attn`` is the kernel with the block mask
prebuilt (it is shared by every layer of a prefill), ``mask`` the block-mask build. Vertical-slash: ``total`` is
the method's whole hook (estimation from the last 64 queries + masks + two FlexAttention calls + merge); on random
inputs its estimated diagonals are scattered (the worst case for block sparsity), so a second row times the same
budgets with the diagonals a real model's heads mostly pick (the nearest 6,096) and 1,000 scattered columns
(its estimation time added; ``slash_only_ms``: the block-sparse call alone). Each sparse row is measured with
FlexAttention compiled as the harness does (``--compile auto``: dynamic lengths after the first) or per length
(``--compile static``); run one process per setting.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scbench.engines.base import cache_kw
from scbench.kernels import flex
from scbench.kernels.flex import block_density
from scbench.kernels import pattern as pat
from scbench.methods.ashape import AShape
from scbench.methods.trishape import TriShape
from scbench.methods.vertical_slash import VerticalSlash

HQ, HKV, D = 32, 8, 128


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() over repeats (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ms = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b))
    return statistics.median(ms)


def local_lines(tq, tk, vs: VerticalSlash, device) -> pat.Pattern:
    """Vertical-slash budgets with the nearest diagonals and scattered columns (per head)."""
    g = torch.Generator(device=device).manual_seed(0)
    cols = torch.zeros(HQ, tk, dtype=torch.bool, device=device)
    cols[:, : vs.init_cols] = True
    idx = torch.rand(HQ, tk, generator=g, device=device).topk(vs.vertical_size - vs.init_cols, -1).indices
    cols.scatter_(-1, idx, True)
    diags = torch.zeros(HQ, tk, dtype=torch.bool, device=device)
    diags[:, : vs.slash_size] = True
    return pat.Pattern(tq, tk, cols, diags, scattered_cols=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", default="auto", choices=["auto", "static"],
                    help="auto: the harness default (dynamic lengths after the first); static: one kernel per length "
                         "(run one process per setting: compiled graphs are shared within a process)")
    ap.add_argument("--out", default=None, help="default: results/perf/sparse_prefill_{attention,model}.json")
    ap.add_argument("--model", action="store_true", help="time the whole random-weight 8B-shaped model")
    ap.add_argument("--model-repeats", type=int, default=1)
    ap.add_argument("--vs-estimated-max", type=int, default=32768,
                    help="--model: longest prompt for vertical-slash with estimated (scattered) lines")
    ap.add_argument("--tiny", action="store_true", help="--model: a 2-layer toy model (debugging, also on CPU)")
    ap.add_argument("--kernel-options", default=None,
                    help="JSON: FlexAttention kernel_options (default: flex.KERNEL_OPTIONS)")
    args = ap.parse_args()
    if args.kernel_options is not None:
        flex.KERNEL_OPTIONS = json.loads(args.kernel_options)
    if args.model:
        args.out = args.out or "results/perf/sparse_prefill_model.json"
        return whole_model(args)
    args.out = args.out or "results/perf/sparse_prefill_attention.json"
    dev = torch.device("cuda")
    scale = D**-0.5
    rows = []
    t_start = time.time()
    for t in args.lengths:
        g = torch.Generator(device=dev).manual_seed(t)
        q = torch.randn(1, HQ, t, D, generator=g, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, HKV, t, D, generator=g, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, HKV, t, D, generator=g, device=dev, dtype=torch.bfloat16)
        causal = pat.causal_cells(t, t)

        def row(method, ms, **extra):
            r = {"tokens": t, "method": method, "ms": round(ms, 3), **extra}
            rows.append(r)
            print(json.dumps(r), flush=True)

        with torch.inference_mode():
            dense_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                      enable_gqa=True), args.repeats)
            flops = 2 * 2 * HQ * D * causal  # QK^T and PV over the causal cells
            row("dense_sdpa", dense_ms, speedup=1.0, density=1.0, block_density=1.0,
                tflops=round(flops / dense_ms / 1e9, 1))
            flex.DYNAMIC = None if args.compile == "auto" else False
            tag = f" [{args.compile} compile]"
            for m in (AShape(), TriShape()):
                p = m.pattern(0, q, k, scale)
                mask_ms = timed(lambda: flex.block_mask(p), args.repeats)
                bm = flex.block_mask(p)
                attn_ms = timed(lambda: flex.attention(q, k, v, p, scale, bm), args.repeats)
                hook_ms = timed(lambda: m.prefill_attention(0, q, k, v, scale), args.repeats)
                row(m.label() + tag, attn_ms, speedup=round(dense_ms / attn_ms, 2), mask_ms=round(mask_ms, 3),
                    hook_ms=round(hook_ms, 3), density=round(p.computed_cells() / causal, 5),
                    block_density=round(block_density(bm, t, t), 5))
            vs = VerticalSlash()
            est_ms = timed(lambda: vs.pattern(0, q, k, scale), args.repeats)
            if args.compile == "auto":
                total_ms = timed(lambda: vs.prefill_attention(0, q, k, v, scale), args.repeats)
                p = vs.pattern(0, q, k, scale)
                main = pat.Pattern(t, t, torch.zeros_like(p.cols), p.diags)
                row(vs.label() + " [estimated on random q,k]" + tag, total_ms,
                    speedup=round(dense_ms / total_ms, 2), estimate_ms=round(est_ms, 3),
                    density=round(p.computed_cells() / causal / HQ, 5),
                    block_density=round(block_density(flex.block_mask(main), t, t), 5))
            p = local_lines(t, t, vs, dev)
            main = pat.Pattern(t, t, torch.zeros_like(p.cols), p.diags)
            lines_ms = timed(lambda: flex.attention(q, k, v, p, scale), args.repeats)
            main_ms = timed(lambda: flex.attention(q, k, v, main, scale), args.repeats)
            row(vs.label() + " [nearest diagonals]" + tag, lines_ms + est_ms,
                speedup=round(dense_ms / (lines_ms + est_ms), 2), estimate_ms=round(est_ms, 3),
                kernel_ms=round(lines_ms, 3), slash_only_ms=round(main_ms, 3),
                density=round(p.computed_cells() / causal / HQ, 5),
                block_density=round(block_density(flex.block_mask(main), t, t), 5))
        del q, k, v
        torch.cuda.empty_cache()
    print(f"\n{'tokens':>7} {'method':70} {'ms':>9} {'speed-up':>8} {'density':>8} {'blocks':>7}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['method'][:70]:70} {r['ms']:>9.2f} {r['speedup']:>7.2f}x "
              f"{r['density']:>8.4f} {r['block_density']:>7.4f}")
    out = {
        "what": "one Llama-3.1-8B attention layer prefill (32 q / 8 kv heads, d=128, bf16, batch 1), median ms",
        "device": torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "compile": args.compile,
        "kernel_options": flex.KERNEL_OPTIONS,
        "wall_s": round(time.time() - t_start, 1),
        "rows": rows,
    }
    write(args.out, out)


def write(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


class NearestSlash(VerticalSlash):
    """Vertical-slash whose estimation runs in full (its cost counted) but whose diagonals are then replaced by
    the nearest ``slash_size``: the shape real heads mostly pick, which a random-weight model does not show."""

    def pattern(self, layer_idx, q, k, scale):
        p = super().pattern(layer_idx, q, k, scale)
        p.diags.zero_()
        p.diags[:, : self.slash_size] = True
        return p


def model_config(layers: int, hidden: int, heads: int, kv_heads: int, mlp: int, vocab: int, window: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                       max_position_embeddings=window, rope_theta=500000.0, tie_word_embeddings=False)


def matmul_peak(dev, n: int = 8192) -> float:
    """Measured bf16 matmul TFLOP/s (n x n x n)."""
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, 10)
    return 2 * n**3 / ms / 1e9


def whole_model(args) -> None:
    from transformers import DynamicCache, LlamaForCausalLM

    from scbench.engines import attention

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims = (32, 4096, 32, 8, 14336, 128256) if not args.tiny else (2, 256, 4, 2, 512, 1000)
    cfg = model_config(*dims, window=max(args.lengths))
    attention.register()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(default)
    model.set_attn_implementation(attention.NAME)
    flex.DYNAMIC = None if args.compile == "auto" else False
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    peak = matmul_peak(dev) if dev.type == "cuda" else None
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    methods = {"dense_sdpa": None, "ashape": AShape(), "trishape": TriShape(),
               "vertical_slash [estimated]": VerticalSlash(), "vertical_slash [nearest diagonals]": NearestSlash()}
    if args.tiny:
        vs = dict(vertical_size=32, slash_size=64, last_q=16, init_cols=4, local_diags=8)
        methods = {"dense_sdpa": None, "ashape": AShape(n_init=4, n_local=64),
                   "trishape": TriShape(n_init=4, n_local=64, n_last=16),
                   "vertical_slash [estimated]": VerticalSlash(**vs),
                   "vertical_slash [nearest diagonals]": NearestSlash(**vs)}
    meta = {
        "what": "whole-model prefill, Llama-3.1-8B shape, random bf16 weights, batch 1, scbench attention + "
                "DynamicCache, logits_to_keep=1; median seconds of --model-repeats forwards after one warm-up",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "params_non_embedding": n_params, "compile": args.compile,
        "kernel_options": flex.KERNEL_OPTIONS,
    }
    rows, t_start = [], time.time()
    for t in args.lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, t), device=dev, generator=torch.Generator(dev).manual_seed(t))
        dense_s = None
        for name, m in methods.items():
            if name.endswith("[estimated]") and t > args.vs_estimated_max:
                continue

            def forward():
                ctx = attention.AttnContext(method=m, sparse=m is not None)
                with torch.inference_mode(), attention.active(ctx):
                    model(input_ids=ids, **{cache_kw(model): DynamicCache(config=cfg)}, use_cache=True, logits_to_keep=1)
                return ctx

            forward()  # warm-up: compiles FlexAttention for this length, plans cuDNN
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            secs = []
            for _ in range(args.model_repeats):
                sync()
                t0 = time.perf_counter()
                ctx = forward()
                sync()
                secs.append(time.perf_counter() - t0)
            s = statistics.median(secs)
            tag = name[name.find(" ["):] if "[" in name else ""
            r = {"tokens": t, "method": name if m is None else m.label() + tag, "s": round(s, 4),
                 "density": round(ctx.cells_computed / ctx.cells_total, 5)}
            if m is None:
                dense_s = s
                flops = 2 * n_params * t + 2 * 2 * cfg.num_attention_heads * cfg.head_dim * pat.causal_cells(t, t) \
                    * cfg.num_hidden_layers
                r["tflops"] = round(flops / s / 1e12, 1)
                if peak:
                    r["matmul_peak_tflops"], r["fraction_of_peak"] = round(peak, 1), round(flops / s / 1e12 / peak, 3)
            r["speedup"] = round(dense_s / s, 2)
            if dev.type == "cuda":
                r["peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
            rows.append(r)
            print(json.dumps(r), flush=True)
            write(args.out, {**meta, "wall_s": round(time.time() - t_start, 1), "rows": rows})  # partial results
        del ids
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'tokens':>7} {'method':90} {'s':>8} {'speed-up':>8} {'density':>8}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['method'][:90]:90} {r['s']:>8.3f} {r['speedup']:>7.2f}x {r['density']:>8.4f}")
    write(args.out, {**meta, "wall_s": round(time.time() - t_start, 1), "rows": rows})


if __name__ == "__main__":
    main()
