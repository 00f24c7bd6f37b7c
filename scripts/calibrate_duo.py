"""Offline DuoAttention calibration: one gate per KV head, optimised on generated retrieval data; writes the file
``DuoAttention(heads=...)`` loads.

    python scripts/calibrate_duo.py [--model embedded:smollm2] [--adapter DIR] [--task scbench_kv] [--length 384] [--samples 4]
        [--steps 16] [--lr 0.05] [--reg 0.05] [--n-init 32 --n-local 224] --out FILE

The paper's procedure (Xiao et al., arXiv 2410.10819, s.3.2), shortened to run on a CPU in minutes: every
attention layer outputs ``a * full + (1 - a) * streaming`` per KV head (``a`` the head's gate in [0, 1], initial 1,
streaming = A-shape with ``--n-init`` sinks and ``--n-local`` recent keys), the model's weights stay frozen, and
the gates minimise the mean squared distance between the last hidden states of the gated model and of the full
model on the answer tokens of synthetic retrieval prompts (the task's generated rows: context, question, gold
answer) plus ``--reg`` times the mean gate (the L1 push towards streaming). Adam, gates clamped to [0, 1] after
each step. Differences from the paper: a few dozen steps on a handful of short prompts (the paper: 2,000 steps on
passkey prompts up to the model's window) -- the ranking of heads, not the gates' values, is what the method uses.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scbench.engines import attention
from scbench.kernels import pattern as pat


class GatedAttention:
    """Stands in for a method during a forward: mixes full and A-shape attention per KV head with trainable gates."""

    def __init__(self, gates: torch.Tensor, n_init: int, n_local: int):
        self.gates, self.n_init, self.n_local = gates, n_init, n_local

    def prefill_attention(self, layer_idx, q, k, v, scale):
        full = attention.causal_attention(q, k, v, scale)
        band = pat.band(q.shape[-2], k.shape[-2], self.n_init, self.n_local, device=q.device).mask()[0]
        stream = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scale,
                                                                  enable_gqa=q.shape[1] != k.shape[1])
        a = self.gates[layer_idx].repeat_interleave(q.shape[1] // k.shape[1]).view(1, -1, 1, 1)
        return a * full + (1 - a) * stream


def samples(engine, task_name: str, n: int, length: int, seed: int) -> list[tuple[list[int], int]]:
    """(ids, answer tokens) per generated row: context + first question + gold answer, the answer last."""
    from scbench.data.loaders import generate_rows
    from scbench.registry import TASKS

    out = []
    for r in generate_rows(TASKS.get(task_name), n, length, 1, seed):
        turn = r["multi_turns"][0]
        answer = turn["answer"] if isinstance(turn["answer"], str) else str(turn["answer"])
        prompt = engine.encode(f"{r['context']}\n\n{turn['input']}", add_special_tokens=True)
        ans = engine.encode(answer, add_special_tokens=False)
        out.append((prompt + ans, len(ans)))
    return out


def hidden(engine, ids: list[int], method=None) -> torch.Tensor:
    """Last hidden states [T, hidden] of the base model; ``method`` set: through its prefill_attention."""
    ctx = attention.AttnContext(method=method, sparse=method is not None)
    with attention.active(ctx):
        out = engine.model.model(input_ids=torch.tensor([ids], device=engine.device), use_cache=False)
    return out.last_hidden_state[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--adapter", default=None, help="LoRA adapter folder merged at load (e.g. models/smollm2-135m-probe)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--task", default="scbench_kv")
    ap.add_argument("--length", type=int, default=384)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--reg", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-init", type=int, default=32)
    ap.add_argument("--n-local", type=int, default=224)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from scbench.engines.hf import HFEngine

    t0 = time.time()
    engine = HFEngine(args.model, device=args.device, dtype="float32", adapter=args.adapter)
    engine.model.requires_grad_(False)
    data = samples(engine, args.task, args.samples, args.length, args.seed)
    with torch.no_grad():
        targets = [hidden(engine, ids)[-n:] for ids, n in data]
    gates = torch.ones(engine.num_layers, engine.kv_heads, device=engine.device, requires_grad=True)
    opt = torch.optim.Adam([gates], lr=args.lr)
    mixer = GatedAttention(gates, args.n_init, args.n_local)
    history = []
    for step in range(args.steps):
        (ids, n), target = data[step % len(data)], targets[step % len(data)]
        distill = torch.nn.functional.mse_loss(hidden(engine, ids, mixer)[-n:], target)
        loss = distill + args.reg * gates.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            gates.clamp_(0.0, 1.0)
        history.append({"step": step, "distill": round(distill.item(), 6), "mean_gate": round(gates.mean().item(), 4)})
        print(json.dumps(history[-1]), flush=True)
    out = {
        "what": "DuoAttention gates per layer and KV head (scripts/calibrate_duo.py); larger = retrieval head",
        "model": args.model, "adapter": args.adapter, "task": args.task, "length": args.length, "samples": args.samples, "seed": args.seed,
        "steps": args.steps, "lr": args.lr, "reg": args.reg, "n_init": args.n_init, "n_local": args.n_local,
        "prompt_tokens": [len(ids) for ids, _ in data],
        "gates": [[round(float(x), 5) for x in row] for row in gates.detach().cpu()],
        "history": history, "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} in {out['seconds']} s")


if __name__ == "__main__":
    main()
