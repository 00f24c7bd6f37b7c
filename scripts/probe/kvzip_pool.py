"""Where KVzip's model-wide pool goes, and what its reconstruction costs, on one generated context.

    python scripts/probe/kvzip_pool.py [--length 900] [--budget 256] [--chunk 512]

Prefills one generated ``scbench_kv`` context (``--length`` approximate tokens) on the probe model with
``kvzip(level=pair)`` and prints the tokens each layer keeps (over its KV heads), the per-head extremes, the prefill
time and the reconstruction's time and repeat tokens (its declared costs). Numbers quoted in the header of
results/reference/all_methods_probe.md.
"""
from __future__ import annotations

import argparse

from scbench.data.loaders import generate_rows
from scbench.methods.kvzip import KVzip
from scbench.registry import TASKS
from scbench.run import get_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=900)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()
    e = get_engine({"name": "smollm2-135m-probe", "path": "embedded:smollm2", "adapter": "models/smollm2-135m-probe",
                    "device": "cpu"})
    row = generate_rows(TASKS.get("scbench_kv"), 1, args.length, 1, 0)[0]
    ids = e.encode(row["context"], add_special_tokens=True)
    s = e.session(KVzip(budget=args.budget, chunk=args.chunk))
    fs = s.feed(ids, compress=True, sparse=False)
    kept = [sum(layer.lengths) for layer in s.cache.layers]
    print(f"{len(ids)} tokens; kept per layer (all KV heads): {kept}")
    print("per head min/max:", min(min(layer.lengths) for layer in s.cache.layers),
          max(max(layer.lengths) for layer in s.cache.layers))
    print(f"prefill s {fs.seconds - fs.compress_s:.2f}, compress s {fs.compress_s:.2f}, costs {s.method.take_costs(s)}")


if __name__ == "__main__":
    main()
