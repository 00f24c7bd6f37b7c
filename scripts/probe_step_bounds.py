"""What one decode step of an 8B-shaped bf16 model can cost at best on this GPU: the floors the fast path is held to.

    python scripts/probe_step_bounds.py --out F.json

Measures (CUDA graphs, median of repeats):
- copy bandwidth: device-to-device copy of 4 GiB (bytes read + written / time);
- read bandwidth: a sum over 8 GiB (bytes read / time), the figure a decode step streams at best;
- the weight GEMVs of one Llama-3.1-8B step (32 layers x q,k,v,o,gate,up,down + lm_head, batch 1) replayed as one
  graph: the floor of a decode step before attention and the elementwise work.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json

import torch


def timed_graph(fn, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    x = torch.empty(2 << 30, dtype=torch.bfloat16, device=dev)  # 4 GiB
    y = torch.empty_like(x)
    t = timed_graph(lambda: y.copy_(x))
    out["copy_TBps"] = 2 * x.numel() * 2 / t / 1e12
    del y
    z = torch.empty(4 << 30, dtype=torch.bfloat16, device=dev)  # 8 GiB
    t = timed_graph(lambda: z.sum(dtype=torch.float32))
    out["read_TBps"] = z.numel() * 2 / t / 1e12
    del x, z
    h, inter, kv, layers, vocab = 4096, 14336, 1024, 32, 128256
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    ws = [[torch.randn(o, i, dtype=torch.bfloat16, device=dev) * 0.01 for o, i in shapes] for _ in range(layers)]
    head = torch.randn(vocab, h, dtype=torch.bfloat16, device=dev) * 0.01
    v = torch.randn(1, h, dtype=torch.bfloat16, device=dev)
    vi = torch.randn(1, inter, dtype=torch.bfloat16, device=dev)

    def step():
        for lw in ws:
            for w in lw:
                torch.nn.functional.linear(vi if w.shape[1] == inter else v, w)
        torch.nn.functional.linear(v, head)

    t = timed_graph(step)
    nbytes = sum(w.numel() * 2 for lw in ws for w in lw) + head.numel() * 2
    out["gemv_step_ms"] = t * 1000
    out["gemv_bytes_GB"] = nbytes / 1e9
    out["gemv_TBps"] = nbytes / t / 1e12
    out["launches"] = layers * len(shapes) + 1
    for k, val in out.items():
        print(f"{k:16s} {val}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
