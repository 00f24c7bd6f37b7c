"""Where vertical-slash's prefill time goes: one Llama-3.1-8B attention layer (32 q / 8 kv heads, d=128, bf16) on the
GPU, each piece of ``VerticalSlash.prefill_attention`` timed alone (CUDA events, median), then the whole hook and a
torch.profiler table of its kernels.

    python scripts/profile_vs_prefill.py [--lengths 65536 131072] [--repeats 5] [--out results/perf/vs_profile.json]
        [--variants] [--old-masks] [--options '{"num_stages": 2}' ...] [--sums-configs 64:4 ...]

The pattern is the bench's "nearest diagonals" case (``scripts/bench_sparse_prefill.py``): the estimation runs in
full, then the diagonals are replaced by the nearest ``slash_size`` (what real heads mostly pick; random weights show
no structure) and the columns stay the estimated scattered ones. Rows: dense SDPA; A-shape's kernel with its mask
prebuilt (the per-block rate to compare with); the estimation (``line_scores``) and the two top-k; the main block-mask
build; the fallback test (density, one host sync); the main FlexAttention call; the gathered-columns call (its gather,
mask and kernel); the merge; the whole hook.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sparse_prefill import D, HKV, HQ, NearestSlash, timed  # noqa: E402

from scbench.kernels import flex  # noqa: E402
from scbench.kernels.flex import block_density  # noqa: E402
from scbench.methods.ashape import AShape  # noqa: E402
from scbench.methods.vertical_slash import line_scores  # noqa: E402

def old_masks(r, q, k, v, p, main_p, bm, scale, repeats) -> None:
    """Both calls with the cell tests as they were up to 5ce23f3 (int64 constants and positions, the main call also
    reading its all-zero column table, the gathered call its validity table): the same-box baseline of the
    ``flex_main`` / ``gathered_cols`` rows (equal outputs)."""
    cols, diags = main_p.cols, main_p.diags
    off, last = torch.tensor(p.offset, device=q.device), torch.tensor(p.tk - 1, device=q.device)

    def main_mod(b, h, q_idx, kv_idx):
        d = q_idx + off - kv_idx
        dd = torch.clamp(torch.minimum(d, last), min=0)
        return (d >= 0) & (cols[h, torch.minimum(kv_idx, last)] | diags[h, dd])

    bmo = flex._from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                               mask_mod=main_mod, seq_lengths=(p.tq, p.tk))
    r["old_main_int64_bytes"] = timed(lambda: flex._flex_lse(q, k, v, bmo, scale, True), repeats)
    n, pos, valid, kg, vg = flex.gather_cols(k, v, p, q.shape[1])
    t_n = torch.tensor(n - 1, device=q.device)

    def gathered_mod(b, h, q_idx, kv_idx):
        t = torch.minimum(kv_idx, t_n)
        d = q_idx + off - pos[h, t]
        dd = torch.clamp(torch.minimum(d, last), min=0)
        return valid[h, t] & (d >= 0) & ~p.diags[h, dd]

    bmg = flex._from_kv_blocks(*flex.gathered_lists(p, pos, valid, n), mask_mod=gathered_mod, seq_lengths=(p.tq, n))
    r["old_gathered_int64_bytes"] = timed(lambda: flex._flex_lse(q, kg, vg, bmg, scale, False), repeats)


def variants(r, q, k, v, p, main_p, bm, scale, vs, repeats) -> None:
    """Mask-cost probes (timings only, the outputs are not the pattern's): the main call with the arithmetic band
    test (equal to the table for nearest diagonals), with a causal-only test, and the gathered call without the
    diagonal exclusion, and densely over the gathered keys without any mask."""
    band = dataclasses.replace(main_p, band=(0, vs.slash_size))
    bmb = flex._from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                               mask_mod=flex._mask_mod(band), seq_lengths=(p.tq, p.tk))
    r["v_main_band_mask"] = timed(lambda: flex._flex_lse(q, k, v, bmb, scale, True), repeats)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    bmc = flex._from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                               mask_mod=causal, seq_lengths=(p.tq, p.tk))
    r["v_main_causal_mask"] = timed(lambda: flex._flex_lse(q, k, v, bmc, scale, True), repeats)
    no_diags = dataclasses.replace(p, diags=torch.zeros_like(p.diags))
    r["v_gathered_no_diag_exclusion"] = timed(lambda: flex._gathered_cols(q, k, v, no_diags, scale), repeats)
    n, pos, valid, kg, vg = flex.gather_cols(k, v, p, q.shape[1])
    t_n = torch.tensor(n - 1, device=q.device)

    def causal_cols(b, h, q_idx, kv_idx):
        t = torch.minimum(kv_idx, t_n)
        return valid[h, t] & (q_idx + p.offset >= pos[h, t])

    lists = flex.gathered_lists(p, pos, valid, n)
    bmg = flex._from_kv_blocks(*lists, mask_mod=causal_cols, seq_lengths=(p.tq, n))
    r["v_gathered_causal_mask_only"] = timed(lambda: flex._flex_lse(q, kg, vg, bmg, scale, False), repeats)
    kg, vg = (x.repeat_interleave(4, 1)[:, :, :n].contiguous() for x in (k, v))
    r["v_gathered_dense_no_mask"] = timed(lambda: flex._flex_lse(q, kg, vg, None, scale, False), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile-rows", type=int, default=25, help="kernels listed from torch.profiler (0: none)")
    ap.add_argument("--variants", action="store_true",
                    help="also time the two FlexAttention calls with cheaper (not equivalent) masks: what the mask "
                         "tables cost")
    ap.add_argument("--options", nargs="*", default=[],
                    help='also time both calls under these FlexAttention kernel options (JSON, added to '
                         'flex.KERNEL_OPTIONS), e.g. \'{"num_stages": 2}\'')
    ap.add_argument("--old-masks", action="store_true",
                    help="also time both calls with the cell tests before the int32 ones (same outputs): the same-box "
                         "baseline of the flex_main / gathered_cols rows")
    ap.add_argument("--sums-configs", nargs="*", default=[],
                    help="also time the estimate kernel's sums with these BJ:warps configs (e.g. 128:8 256:4)")
    ap.add_argument("--out", default="results/perf/vs_profile.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    scale = D**-0.5
    rows, t0 = [], time.time()
    for t in args.lengths:
        g = torch.Generator(device=dev).manual_seed(t)
        q, k, v = (torch.randn(1, h, t, D, generator=g, device=dev, dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
        vs = NearestSlash()
        r = {"tokens": t}
        with torch.inference_mode():
            r["dense_sdpa"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                           enable_gqa=True), args.repeats)
            a = AShape()
            pa = a.pattern(0, q, k, scale)
            bma = flex.block_mask(pa)
            r["ashape_kernel"] = timed(lambda: flex.attention(q, k, v, pa, scale, bma), args.repeats)
            r["ashape_blocks"] = block_density(bma, t, t)
            r["estimate_line_scores"] = timed(lambda: line_scores(q[0], k[0], scale, vs.last_q), args.repeats)
            vert, sl = line_scores(q[0], k[0], scale, vs.last_q)
            r["topk_vertical"] = timed(lambda: vert.topk(vs.vertical_size, -1), args.repeats)
            r["topk_slash"] = timed(lambda: sl.topk(vs.slash_size, -1), args.repeats)
            from scbench.kernels import vs_lines

            def estimate():
                return vs_lines.line_scores_triton(q[0], k[0], scale, vs.last_q)

            r["estimate_kernels"] = timed(estimate, args.repeats)
            default = vs_lines.SUMS_CONFIG
            for c in args.sums_configs:
                vs_lines.SUMS_CONFIG = tuple(int(x) for x in c.split(":"))
                r[f"estimate_kernels_{c}"] = timed(estimate, args.repeats)
            vs_lines.SUMS_CONFIG = default
            r["pattern_total"] = timed(lambda: vs.pattern(0, q, k, scale), args.repeats)
            p = vs.pattern(0, q, k, scale)
            main_p = p.diagonals_only()
            r["block_mask_main"] = timed(lambda: flex.block_mask(main_p), args.repeats)
            bm = flex.block_mask(main_p)
            r["main_blocks"] = block_density(bm, t, t)

            r["density_sync"] = timed(lambda: block_density(bm, t, t), args.repeats)
            r["flex_main"] = timed(lambda: flex._flex_lse(q, k, v, bm, scale, True), args.repeats)
            r["gathered_cols"] = timed(lambda: flex._gathered_cols(q, k, v, p, scale), args.repeats)
            o1, l1 = flex._flex_lse(q, k, v, bm, scale, True)
            o2, l2 = flex._gathered_cols(q, k, v, p, scale)
            merge = flex._compiled(flex._merge)
            r["merge"] = timed(lambda: merge(o1, l1, o2, l2), args.repeats)
            r["flex_attention_with_bm"] = timed(lambda: flex.attention(q, k, v, p, scale, bm), args.repeats)
            if args.variants:
                variants(r, q, k, v, p, main_p, bm, scale, vs, args.repeats)
            for spec in args.options:  # both calls under other FlexAttention kernel options (same outputs)
                default = flex.KERNEL_OPTIONS
                flex.KERNEL_OPTIONS = {**default, **json.loads(spec)}
                bmo = flex.block_mask(main_p)
                r[f"flex_main {spec}"] = timed(lambda: flex._flex_lse(q, k, v, bmo, scale, True), args.repeats)
                r[f"gathered_cols {spec}"] = timed(lambda: flex._gathered_cols(q, k, v, p, scale), args.repeats)
                flex.KERNEL_OPTIONS = default
            if args.old_masks:
                old_masks(r, q, k, v, p, main_p, bm, scale, args.repeats)
            r["hook"] = timed(lambda: vs.prefill_attention(0, q, k, v, scale), args.repeats)
            vs.take_costs(None)
            r["hook_x_dense"] = r["dense_sdpa"] / r["hook"]
            if args.profile_rows:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    vs.prefill_attention(0, q, k, v, scale)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile_rows,
                                                  max_name_column_width=70)
                print(table)
                r["profile"] = table
        rows.append({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in r.items()})
        print(json.dumps({k_: v_ for k_, v_ in rows[-1].items() if k_ != "profile"}), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    out = {"what": "vertical-slash prefill hook, one 8B-shaped layer, pieces timed alone (median ms)",
           "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "repeats": args.repeats,
           "wall_s": round(time.time() - t0, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
