"""Issue 23 microbenchmarks on CUDA (one H200, < 40 s): KVzip's scoring and repeat-forward attention at a 131K
chunk shape, and the ragged decode kernel on DuoAttention-shaped caches.

    python scripts/bench_kvzip_duo.py [--tokens 131072] [--out FILE]

1. Scores of one chunk x one layer (Llama-3.1-8B: 8 KV heads x 4, D=128, bf16; 2,048-token chunk + 27 repeat-prompt
   tokens): the torch blocks (float32, 512 MiB blocks) vs the fused Triton passes; x 32 layers x chunks = the
   context's scoring time.
2. The repeat forward's attention of one layer (2,075 queries over the context + themselves): flash with a
   lower-right bias vs cuDNN over the context + cuDNN causal over the chunk, merged (first call = cuDNN's plan).
3. Decode attention of a 32-layer step (different buffers per layer, so the L2 holds none), DuoAttention-shaped
   (per layer 4 heads at the full context, 4 at 4,096; suffix buffer 256): the ragged kernel at several work
   splits (8,192: as many programs as the per-head grid of the old kernel) vs the dense split-KV kernel over the
   full context. Prints JSON lines.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def events(fn, n=5):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


def scores(n_ctx, out):
    from scbench.methods import reconstruction as rec

    r, chunk = 2075, 2048
    q = torch.randn(8, 4, r, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(8, n_ctx + r, 128, device="cuda", dtype=torch.bfloat16)
    a = n_ctx // 2
    t_torch = events(lambda: rec.layer_scores(q, k, 4, a, a + chunk, kernel=False), 2)
    t_kern = events(lambda: rec.layer_scores(q, k, 4, a, a + chunk, kernel=True), 5)
    want = rec.layer_scores(q, k, 4, a, a + chunk, kernel=False)
    got = rec.layer_scores(q, k, 4, a, a + chunk, kernel=True)
    agree = [len(set(got[h].topk(512).indices.tolist()) & set(want[h].topk(512).indices.tolist())) / 512
             for h in range(8)]
    from scbench.kernels import h2o_scores

    keys = torch.cat([k[:, :4], k[:, a : a + chunk], k[:, k.shape[1] - r :]], dim=1)[None]
    qq = q.reshape(1, 32, r, 128)
    for bm, bn, warps in ((64, 64, 4), (128, 64, 8), (64, 128, 8)):
        cfg = dict(BM=bm, BN=bn, num_warps=warps, num_stages=3, EXP=0)
        out[f"score_kernel_ms_bm{bm}_bn{bn}_w{warps}"] = round(events(
            lambda: h2o_scores.accumulated_attention_triton(keys, qq, reduce="max", ncols=4 + chunk, config=cfg), 5), 3)
    per_ctx = 32 * (n_ctx // chunk) / 1000
    out.update(score_torch_ms=round(t_torch, 3), score_kernel_ms=round(t_kern, 3),
               score_max_abs_diff=float((got - want).abs().max()), score_top512_overlap_min=min(agree),
               score_torch_ctx_s=round(t_torch * per_ctx, 2), score_kernel_ctx_s=round(t_kern * per_ctx, 2))
    print(json.dumps(out), flush=True)


def forward_attention(n_ctx, out):
    from scbench.kernels import dense

    r = 2075
    q = torch.randn(1, 32, r, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, n_ctx + r, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t_flash = events(lambda: dense.causal_attention(q, k, v), 3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    split = dense.prefix_split_cudnn(q, k, v, None)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if split is None:
        out.update(attn_flash_ms=round(t_flash, 2), attn_split="cuDNN refused")
    else:
        t_split = events(lambda: dense.prefix_split_cudnn(q, k, v, None), 3)
        diff = float((split.float() - dense.causal_attention(q, k, v).float()).abs().max())
        per_ctx = 32 * (n_ctx // 2048) / 1000
        out.update(attn_flash_ms=round(t_flash, 2), attn_split_ms=round(t_split, 2), attn_split_first_s=round(first, 3),
                   attn_split_max_diff=diff, attn_flash_ctx_s=round(t_flash * per_ctx, 2),
                   attn_split_ctx_s=round(t_split * per_ctx, 2))
    print(json.dumps(out), flush=True)
    del q, k, v


def ragged(n_ctx, out, layers=32):
    from scbench.engines.fastdecode import split_kv_decode_attention
    from scbench.kernels import ragged_decode as rd

    lengths = [n_ctx] * 4 + [4096] * 4
    c, d = 256, 128
    offs = torch.tensor([sum(lengths[:i]) for i in range(8)], device="cuda")
    ln = torch.tensor(lengths, device="cuda")
    bufs = [(torch.empty(sum(lengths), d, device="cuda", dtype=torch.bfloat16).normal_(),
             torch.empty(sum(lengths), d, device="cuda", dtype=torch.bfloat16).normal_()) for _ in range(layers)]
    sk, sv = (torch.randn(1, 8, c, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(1, 32, 1, d, device="cuda", dtype=torch.bfloat16)
    at = torch.tensor([100], device="cuda")
    gib = sum(2 * b[0].numel() * 2 for b in bufs) / 2**30
    res = {}
    for split in (None, 8192, 4096, 2048, 1024, 640):
        work = rd.WorkList(lengths, c, "cuda", split=split)
        res[str(split or f"default{work.split}")] = round(events(lambda: [rd.ragged_decode_triton(
            q, pk, pv, offs, ln, work, sk, sv, at) for pk, pv in bufs], 5), 3)
    # correctness at the full shape, one layer, against the float32 torch path
    rows = rd.head_of_rows(lengths, "cuda")
    got = rd.ragged_decode_triton(q, *bufs[0], offs, ln, rd.WorkList(lengths, c, "cuda"), sk, sv, at)
    want = rd.ragged_decode_attention(q, *bufs[0], rows, sk, sv, at)
    del bufs
    torch.cuda.empty_cache()
    dense_bufs = [(torch.empty(1, 8, n_ctx + c, d, device="cuda", dtype=torch.bfloat16).normal_(),
                   torch.empty(1, 8, n_ctx + c, d, device="cuda", dtype=torch.bfloat16).normal_())
                  for _ in range(layers)]
    at_d = torch.tensor([n_ctx + 100], device="cuda")
    t_dense = events(lambda: [split_kv_decode_attention(q, k, v, at_d) for k, v in dense_bufs], 5)
    dgib = sum(2 * b[0].numel() * 2 for b in dense_bufs) / 2**30
    out.update(ragged_step_ms=res, ragged_gib=round(gib, 2), dense_step_ms=round(t_dense, 3), dense_gib=round(dgib, 2),
               ragged_max_diff=float((got.float() - want.float()).abs().max()))
    print(json.dumps(out), flush=True)
    del dense_bufs
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--parts", default="scores,attention,ragged")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": a.tokens}
    for part in a.parts.split(","):
        t0 = time.perf_counter()
        {"scores": scores, "attention": forward_attention, "ragged": ragged}[part](a.tokens, out)
        print(f"# {part}: {time.perf_counter() - t0:.1f} s", flush=True)
    if a.out:
        open(a.out, "w").write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
