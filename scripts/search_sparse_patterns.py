"""Offline per-head sparse-pattern search (MInference-style): on sample prompts, which pattern kind best covers
each attention head's probability mass at a budget; writes a file ``VerticalSlash(head_patterns=...)`` loads.

    python scripts/search_sparse_patterns.py [--model embedded:smollm2] [--task scbench_kv] [--length 2048]
        [--samples 2] [--n-init 32 --n-local 224] [--vertical 32 --slash 224] [--blocks 4] --out FILE

Per sample prompt, every layer's queries and keys are captured during a dense prefill (through the registered
``scbench`` attention). For each query head, the exact causal attention probabilities are computed and three
kinds are scored by coverage (mass kept, averaged over query rows) and density (computed / causal cells):
A-shape (``--n-init`` sinks + ``--n-local`` window), vertical-slash as the method runs it (columns and
diagonals estimated from the last ``--last-q`` queries, ``--vertical`` / ``--slash`` budgets) and
MInference's block-sparse kind (64 x 64 blocks, per query block the diagonal block plus the top ``--blocks``-1
key blocks by mean-pooled scores). Each head gets the runnable kind (A-shape or vertical-slash) with the higher
mean coverage over samples; the file also records every kind's coverage and density and the best kind overall
(block-sparse included, which the harness cannot run). Prompts: the task's generated rows (context + first
question), cut to ``--length`` tokens.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scbench.engines import attention
from scbench.kernels import pattern as pat
from scbench.methods.vertical_slash import VerticalSlash

BLOCK = 64


class Recorder:
    """Stands in for a method during a dense prefill: keeps each layer's q and k, computes nothing itself."""

    def __init__(self):
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def prefill_attention(self, layer_idx, q, k, v, scale):
        self.qk[layer_idx] = (q[0].float(), k[0].float(), scale if scale is not None else q.shape[-1] ** -0.5)
        return None  # the registered attention then runs dense causal attention


def probabilities(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax. q: [Hq, T, D]; k: [Hkv, T, D] -> [Hq, T, T] float32."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    s = (q @ k.transpose(-1, -2)) * scale
    t = q.shape[1]
    s.masked_fill_(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return s.softmax(-1)


def block_sparse_mask(q: torch.Tensor, k: torch.Tensor, scale: float, n_blocks: int) -> torch.Tensor:
    """MInference's block-sparse kind: per 64-query block, the diagonal block and the top n_blocks-1 earlier key
    blocks by mean-pooled q.k scores. q: [Hq, T, D]; k: [Hkv, T, D] -> bool [Hq, T, T] (causal)."""
    hq, t, d = q.shape
    nb = -(-t // BLOCK)
    pad = nb * BLOCK - t
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(hq, nb, BLOCK, d).mean(2)
    kk = k.repeat_interleave(hq // k.shape[0], 0)
    kp = torch.nn.functional.pad(kk, (0, 0, 0, pad)).view(hq, nb, BLOCK, d).mean(2)
    s = (qp @ kp.transpose(-1, -2)) * scale
    eye = torch.eye(nb, dtype=torch.bool)
    s.masked_fill_(~torch.ones(nb, nb, dtype=torch.bool).tril(-1), float("-inf"))  # earlier blocks compete
    top = s.topk(min(n_blocks - 1, nb), -1)
    chosen = torch.zeros(hq, nb, nb, dtype=torch.bool).scatter_(-1, top.indices, top.values > float("-inf")) | eye
    cells = chosen.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)[:, :t, :t]
    return cells & torch.ones(t, t, dtype=torch.bool).tril()


def score_layer(q, k, scale, layer_idx, args) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """kind -> (coverage [Hq], density [Hq]) for one layer of one sample."""
    hq, t = q.shape[0], q.shape[1]
    a = probabilities(q, k, scale)
    causal = pat.causal_cells(t, t)
    band = pat.band(t, t, args.n_init, args.n_local).mask()
    vs = VerticalSlash(vertical_size=args.vertical, slash_size=args.slash, last_q=args.last_q,
                       init_cols=min(args.init_cols, args.vertical), local_diags=min(args.local_diags, args.slash))
    masks = {
        "ashape": band.expand(hq, -1, -1),
        "vertical_slash": vs.pattern(layer_idx, q[None], k[None], scale).mask(),
        "block_sparse": block_sparse_mask(q, k, scale, args.blocks),
    }
    return {kind: ((a * m).sum((1, 2)) / t, m.sum((1, 2)).float() / causal) for kind, m in masks.items()}


def prompts(engine, task_name: str, n: int, length: int, seed: int) -> list[list[int]]:
    from scbench.data.loaders import generate_rows
    from scbench.registry import TASKS

    rows = generate_rows(TASKS.get(task_name), n, length + 200, 1, seed)
    out = []
    for r in rows:
        ids = engine.encode(f"{r['context']}\n\n{r['multi_turns'][0]['input']}", add_special_tokens=True)
        out.append(ids[-length:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2", help="model path or id (HFEngine)")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--task", default="scbench_kv")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-init", type=int, default=32)
    ap.add_argument("--n-local", type=int, default=224)
    ap.add_argument("--vertical", type=int, default=32)
    ap.add_argument("--slash", type=int, default=224)
    ap.add_argument("--last-q", type=int, default=64)
    ap.add_argument("--init-cols", type=int, default=8)
    ap.add_argument("--local-diags", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=4, help="block-sparse: 64x64 key blocks per query block")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from scbench.engines.hf import HFEngine

    t0 = time.time()
    engine = HFEngine(args.model, device=args.device, dtype="float32", adapter=args.adapter)
    totals: dict[int, dict[str, list[torch.Tensor]]] = {}
    for ids in prompts(engine, args.task, args.samples, args.length, args.seed):
        rec = Recorder()
        ctx = attention.AttnContext(method=rec, sparse=True)
        with torch.inference_mode(), attention.active(ctx):
            engine.model(input_ids=torch.tensor([ids], device=engine.device), use_cache=False, logits_to_keep=1)
        for layer, (q, k, scale) in sorted(rec.qk.items()):
            for kind, (cov, dens) in score_layer(q.cpu(), k.cpu(), scale, layer, args).items():
                acc = totals.setdefault(layer, {}).setdefault(kind, [torch.zeros_like(cov), torch.zeros_like(dens)])
                acc[0] += cov / args.samples
                acc[1] += dens / args.samples
    layers, best, coverage = [], [], []
    for layer in sorted(totals):
        cov = {kind: v[0] for kind, v in totals[layer].items()}
        kinds = list(cov)
        runnable = torch.stack([cov["ashape"], cov["vertical_slash"]])
        layers.append(["ashape" if c == 0 else "vertical_slash" for c in runnable.argmax(0).tolist()])
        best.append([kinds[i] for i in torch.stack([cov[x] for x in kinds]).argmax(0).tolist()])
        coverage.append({kind: {"coverage": [round(x, 4) for x in v[0].tolist()],
                                "density": [round(x, 4) for x in v[1].tolist()]} for kind, v in totals[layer].items()})
    flat = [k for r in layers for k in r]
    mean = {kind: round(float(torch.stack([totals[l][kind][0] for l in totals]).mean()), 4)
            for kind in ("ashape", "vertical_slash", "block_sparse")}
    chosen_cov = [max(c["ashape"]["coverage"][h], c["vertical_slash"]["coverage"][h])
                  for c in coverage for h in range(len(c["ashape"]["coverage"]))]
    out = {
        "what": "per-head sparse prefill kinds chosen by attention-mass coverage (scripts/search_sparse_patterns.py)",
        "model": args.model, "adapter": args.adapter, "task": args.task, "length": args.length,
        "samples": args.samples, "seed": args.seed,
        "ashape": {"n_init": args.n_init, "n_local": args.n_local},
        "vertical_slash": {"vertical_size": args.vertical, "slash_size": args.slash, "last_q": args.last_q,
                           "init_cols": args.init_cols, "local_diags": args.local_diags},
        "block_sparse": {"block": BLOCK, "blocks": args.blocks},
        "layers": layers,
        "best_any_kind": best,
        "summary": {"heads": len(flat), "ashape": flat.count("ashape"), "vertical_slash": flat.count("vertical_slash"),
                    "best_is_block_sparse": sum(r.count("block_sparse") for r in best),
                    "mean_coverage": mean, "mean_coverage_chosen": round(sum(chosen_cov) / len(chosen_cov), 4)},
        "coverage": coverage,
        "wall_s": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["summary"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
