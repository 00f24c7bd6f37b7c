"""RetrievalAttention's device-tier decode plugin on a real model, layer by layer: each eager decode step's
captured-path attention (CUDA radix select + paged kernel) against the torch rows and gathered attention over the
same q / k / v, and the share of selected rows the two lists have in common. A diagnostic for a fast path whose
predictions leave the plain loop's (scripts/bench_agreement.py); it runs `scbench run` in-process with the step
eager (no CUDA graph) so every layer's call can be checked.

    python scripts/debug_ra_device.py --out $OUT/ra_debug.json [-- more overrides]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--length", type=int, default=7000)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    from scbench.engines import fastdecode
    from scbench.kernels.paged_decode import paged_attention, paged_attention_torch
    from scbench.methods import retrieval_fast as rf

    init = fastdecode.FastDecoder.__init__

    def eager_init(self, *args, **kw):
        init(self, *args, **kw)
        self.use_graph = False

    fastdecode.FastDecoder.__init__ = eager_init
    orig = rf.RetrievalDecode.attend
    rec: list[dict] = []

    def attend(self, kv, l, q, k, v, scale):
        out = orig(self, kv, l, q, k, v, scale)
        sc = q.shape[-1] ** -0.5 if scale is None else scale
        n = kv.at[l : l + 1] + 1
        ref = rf.RetrievalDecode(self.m)
        ref.select = "topk"  # the torch branch of rows()
        rows_ref = ref.rows(kv, l, q, n)
        rows_fast = self.rows(kv, l, q, n)
        want = paged_attention_torch(q.float(), k.float(), v.float(), rows_ref, n, 1, sc)
        tri = paged_attention(q, k, v, rows_ref.int(), n, 1, sc, **self.tune).float()
        err = lambda x: ((x.float() - want).norm() / want.norm()).item()  # noqa: E731
        common = []
        for a_, b_ in zip(rows_fast.view(-1, rows_fast.shape[-1]), rows_ref.view(-1, rows_ref.shape[-1])):
            sa, sb = set(a_[a_ >= 0].tolist()), set(b_[b_ >= 0].tolist())
            common.append(len(sa & sb) / max(1, len(sb)))
        s = q.reshape(q.shape[0], k.shape[1], -1, q.shape[-1]).to(k.dtype) @ k[:, :, : int(n)].transpose(-1, -2)
        rec.append({"layer": l, "n": int(n), "err_fast": err(out), "err_triton_ref_rows": err(tri),
                    "rows_common_min": min(common), "rows_common_mean": statistics.mean(common),
                    "fast_rows_invalid": int(((rows_fast >= int(n)) | (rows_fast < -1)).sum()),
                    "score_max": s.float().abs().max().item(), "q_max": q.float().abs().max().item(),
                    "k_max": k[:, :, : int(n)].float().abs().max().item()})
        return out

    rf.RetrievalDecode.attend = attend
    from scbench import cli

    sys.argv = ["scbench", "run", "model=smollm2-135m", "method=retrieval_attention-device", "task=scbench_kv",
                "mode=multi_request", f"data.length={a.length}", "data.n=1", "data.turns=2", "max_turns=2",
                "max_new_tokens=16", f"store={tempfile.mkdtemp()}/ra_debug.sqlite", "progress=false",
                "timing=sequential", "share_prefill=false", *a.overrides]
    try:
        cli.main()
    except SystemExit:
        pass
    real = [r for r in rec if r["n"] > 1000]
    summary = {"calls": len(rec), "real_calls": len(real)}
    if real:
        for key in ("err_fast", "err_triton_ref_rows", "rows_common_min", "rows_common_mean", "fast_rows_invalid",
                    "score_max", "q_max", "k_max"):
            vals = [r[key] for r in real]
            summary[key] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
        worst = sorted(real, key=lambda r: -r["err_fast"])[:8]
        summary["worst"] = worst
    print(json.dumps(summary, indent=1))
    with open(a.out, "w") as f:
        json.dump({"summary": summary, "calls": rec}, f)


if __name__ == "__main__":
    main()
