"""Where KIVI's end-to-end decode time goes against full attention's, through the session API the runner uses.

    python scripts/profile_kivi_step.py --lengths 131000 32000 --tokenizer DIR [--turns 2] [--new 64] [--budget 70]

Builds the random Llama-3.1-8B-shaped bf16 model, prefills ``length`` random tokens once with full attention, and
derives the KIVI session's cache from that prefill (each layer packed as ``KIVI.compress_cache`` does), so only one
long prefill is paid. Then per method, like a multi-request run: checkpoint after the context; each turn rolls back,
feeds a 40-token query and calls ``session.generate(new)`` (the real fast path), timed in parts (with a device sync
around each): StaticKV allocation, ``load`` into the static buffers (KIVI: its chunk copies and the token-major
value conversion), the graph capture (warm-up), the replay loop, ``store_back``. Then the pure step time (graph
replays timed by CUDA events, no host reads) and the kernels of graph-replayed steps by name (torch.profiler /
CUPTI), per step. Prints everything (one JSON line at the end).
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from scbench.engines import fastdecode
from scbench.engines.hf import HFEngine
from scbench.kernels import kivi_decode
from scbench.kv import cache as kvc
from scbench.kv.quant import KIVILayer
from scbench.run import build_method

T0 = time.perf_counter()
PARTS: dict[str, float] = collections.defaultdict(float)
FUSE0 = kivi_decode.FUSE_FLUSH


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(owner, name: str, label: str) -> None:
    """Wrap ``owner.name`` so each call adds its synced wall time to PARTS[label]."""
    fn = getattr(owner, name)

    def wrapper(*a, **k):
        sync()
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sync()
            PARTS[label] += time.perf_counter() - t

    setattr(owner, name, wrapper)


def instrument() -> None:
    from scbench.methods import kivi_fast

    timed(fastdecode.StaticKV, "__init__", "alloc")
    timed(fastdecode.StaticKV, "load", "load")
    timed(fastdecode.FastDecoder, "_capture", "capture")
    timed(fastdecode.FastDecoder, "_replay", "replay(+capture)")
    timed(fastdecode.StaticKV, "store_back", "store_back")
    timed(kivi_fast.KIVIDecode, "load", "  kivi.load")
    timed(kivi_fast, "values_to_words_fast", "  values_to_words")


_SAVED = {}


def old(on: bool) -> None:
    """Put the plugin's previous load back (every chunk copied each turn, the value layout converted by torch ops),
    or the current one."""
    from scbench.kernels.kivi_flush import values_to_words
    from scbench.methods import kivi_fast

    if not _SAVED:
        _SAVED.update(fast=kivi_fast.values_to_words_fast, load=kivi_fast.KIVIDecode.load)
    if on:
        def load(self, kv, cache):
            self.held = {l: [] for l in self.held}
            return _SAVED["load"](self, kv, cache)

        kivi_fast.values_to_words_fast = lambda vp, bits: values_to_words(vp, bits)
        timed(kivi_fast, "values_to_words_fast", "  values_to_words")
        kivi_fast.KIVIDecode.load = load
    else:
        kivi_fast.values_to_words_fast, kivi_fast.KIVIDecode.load = _SAVED["fast"], _SAVED["load"]


def turns(s, ck, a, n_turns):
    rows = []
    for j in range(n_turns):
        s.rollback(ck)
        q = torch.randint(0, 40000, (40,), generator=torch.Generator().manual_seed(100 + j)).tolist()
        t = time.perf_counter()
        s.feed(q, compress=False, sparse=False)
        sync()
        feed_s = time.perf_counter() - t
        PARTS.clear()
        g = s.generate(a.new)
        n = len(g.tokens) - 1
        row = {"turn": j, "tokens": n, "decode_s": g.decode_s, "tok_s": n / g.decode_s, "path": g.decode_path,
               "warmup_s": g.warmup_s, "query_feed_s": feed_s, "parts_s": dict(PARTS), "ids": g.tokens}
        rows.append(row)
        log(f"turn {j}: {n} tokens, decode {g.decode_s * 1e3:.1f} ms = {n / g.decode_s:.1f} tok/s, path "
            f"{g.decode_path}, warmup {g.warmup_s:.2f} s, query feed {feed_s * 1e3:.0f} ms; parts (ms): "
            + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in PARTS.items()))
    return rows


@torch.inference_mode()
def step_time(dec, s, reps: int) -> float:
    """ms per graph replay (CUDA events, no host reads), from the session's current cache (not stored back)."""
    dec._prepare(s.cache, reps + 1)
    if dec.graph is None:
        dec._capture()
    dec.tok.fill_(1)
    dec.pos.fill_(s.pos)
    dec.graph.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        dec.graph.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps


@torch.inference_mode()
def kernels(dec, s, reps: int, top: int):
    from torch.profiler import ProfilerActivity, profile

    dec._prepare(s.cache, reps + 1)
    if dec.graph is None:
        dec._capture()
    dec.tok.fill_(1)
    dec.pos.fill_(s.pos)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            dec.graph.replay()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / reps / 1000, e.count / reps) for e in prof.key_averages()]
    rows = [r for r in rows if r[1] > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    log(f"  kernels of a graph step: {total:.3f} ms, {sum(r[2] for r in rows):.0f} launches")
    for k, ms, c in rows[:top]:
        log(f"  {ms:7.3f} ms x{c:5.1f}  {k[:110]}")
    return {"kernel_ms": total, "launches": sum(r[2] for r in rows),
            "top": [{"kernel": k[:110], "ms": ms, "count": c} for k, ms, c in rows[:top]]}


def one_length(eng, a, length: int, dev: str) -> dict:
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40000, (length,), generator=rng).tolist()
    sessions = {}
    full = eng.session(build_method({"name": "full"}))
    full.feed(ids, compress=False, sparse=False)
    sync()
    log(f"prefill {length} done")
    if any(n.startswith("kivi") for n in a.methods):
        m = build_method({"name": "kivi", "bits": 2, "group": 32, "residual": 32})
        s = eng.session(m)
        for i, layer in enumerate(full.cache.layers):
            kvc.install_layer(s.cache, i, m.compress_cache(i, layer.keys, layer.values, None))
        s.pos, s.last_logits = full.pos, full.last_logits
        assert all(isinstance(x, KIVILayer) for x in s.cache.layers)
        sync()
        log("kivi cache packed from the prefill")
        for n in a.methods:
            if n.startswith("kivi"):
                sessions[n] = s
    sessions["full"] = full
    report = {"length": length}
    checkpoints = {}
    for name in a.methods:
        s = sessions[name]
        if id(s) not in checkpoints:
            checkpoints[id(s)] = s.checkpoint(rewrites=not kvc.crop_is_exact(s.cache))
        ck = checkpoints[id(s)]
        old(name == "kivi-old")
        fuse = int(name[6:]) if name.startswith("kivi-f") else None  # kivi-f0/1/2: that flush mode, step only
        kivi_decode.FUSE_FLUSH = FUSE0 if fuse is None else fuse
        s.decoder = None  # a fresh decoder and plugin per entry
        torch.cuda.empty_cache()
        log(f"== {name}: {kvc.kv_nbytes(s.cache) / 1e9:.2f} GB KV resident")
        r = report[name] = {"turns": turns(s, ck, a, 1 if fuse is not None else a.turns)}
        if name.startswith("kivi"):
            r["kivi_tune"] = dict(kivi_decode.TUNE, fuse_flush=kivi_decode.FUSE_FLUSH, copies=s.decoder.plugin.copies)
            log(f"  chunks copied by load over the turns: {s.decoder.plugin.copies}")
        if name == "kivi" and "kivi-old" in report:
            same = [x["ids"] == y["ids"] for x, y in zip(r["turns"], report["kivi-old"]["turns"])]
            r["tokens_equal_old_load"] = same
            log(f"  tokens equal to kivi-old's per turn: {same}")
        if name == "kivi-old" or a.device != "cuda" or time.perf_counter() - T0 > a.budget:
            log("step time and kernels skipped (kivi-old: the same step; no CUDA; or the budget spent)")
            continue
        dec = s.decoder
        r["graph_step_ms"] = step_time(dec, s, a.reps)
        log(f"  graph step (events, {a.reps} replays): {r['graph_step_ms']:.3f} ms = {1e3 / r['graph_step_ms']:.1f} tok/s")
        if time.perf_counter() - T0 > a.budget:
            continue
        if fuse is None:
            r["profile"] = kernels(dec, s, 5, a.top)
    old(False)
    kivi_decode.FUSE_FLUSH = FUSE0
    full = report.get("full")
    for name, r in report.items():
        if not isinstance(r, dict) or "turns" not in r:
            continue
        last = r["turns"][-1]["tok_s"]
        ratio = f", {last / full['turns'][-1]['tok_s']:.3f}x full" if full else ""
        step = f", graph step {r['graph_step_ms']:.3f} ms" if "graph_step_ms" in r else ""
        if full and "graph_step_ms" in r and "graph_step_ms" in full:
            step += f" ({full['graph_step_ms'] / r['graph_step_ms']:.3f}x full)"
        log(f"summary {length} {name}: last turn {last:.1f} tok/s{ratio}{step}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[131000])
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--methods", nargs="+", default=["kivi-old", "kivi", "kivi-f0", "full"],
                    help="kivi-old: the plugin's load as before (every chunk copied each turn, torch value conversion); "
                         "kivi-f0 / -f1 / -f2: one turn and the graph step with that flush mode (SCBENCH_KIVI_FLUSH)")
    ap.add_argument("--budget", type=float, default=70.0, help="skip the remaining parts past this many seconds")
    ap.add_argument("--tokenizer")
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    instrument()
    eng = HFEngine(a.model, tokenizer_path=a.tokenizer, device=a.device,
                   decode="fast")
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else a.device
    log(f"model built; {dev}, torch {torch.__version__}")
    report = {"device": dev, "torch": torch.__version__, "lengths": {}}
    for length in a.lengths:
        if time.perf_counter() - T0 > a.budget:
            log(f"budget spent: {length} skipped")
            break
        report["lengths"][length] = one_length(eng, a, length, dev)
        torch.cuda.empty_cache()
    print("JSON", json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
