"""The kvpress side of the cross-check: runs in the kvpress environment (.venv-kvpress), never imports scbench.

    .venv-kvpress/bin/python tests/reference/kvpress_side.py REQUEST.json OUT.json

REQUEST: {"model_dir": a save_pretrained folder (float32 Llama; KVzipPress also reads its tokenizer there), "ids":
[token ids], "presses": [{"name": label, "press": kvpress class name, "kwargs": {...}, "attn": "sdpa" | "eager",
"generate": greedy tokens (optional, default 0), "decode": "prefill" | "decoding" (optional), "pattern":
{"sink_size", "recent_size", "head_scores"} (optional: DuoAttentionPress's pattern instead of its download), "ids":
its own token ids (optional, decoding presses only)}]}. A kwargs value that
is itself {"press": ..., "kwargs": ...} is built first (wrappers: AdaKVPress(press=SnapKVPress(...)),
DecodingPress(base_press=...)). For every press, one prefill of ``ids`` with the press applied (kvpress's forward
hooks, a plain transformers DynamicCache); the kept positions per layer and KV head are recovered by matching each
kept key with the nearest key of an uncompressed prefill of the same ids (compression happens after each layer's
attention, so the uncompressed keys are the ones the press saw), or, for the head-wise presses that only mask
(AdaKVPress, KVzipPress: ``module.masked_key_indices``, the keys stay), as every position not masked. With
"generate": greedy tokens decoded after the prefill (the press still active when "decode" is "decoding":
DecodingPress compresses there), and the final cache's keys.
OUT: {"versions": {...}, "<label>": {"kept": [layer][head] -> sorted positions, "max_match_dist": float,
"masked": bool, "tokens": [greedy ids], "final_keys": [layer] -> [H][n][D] nested lists (only with generate)}}.
"""
from __future__ import annotations

import json
import sys

import torch


def prefill(model, ids, press=None):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        if press is None:
            model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        else:
            with press(model):
                model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    return [layer.keys.clone() for layer in cache.layers]


def build(spec: dict):
    """{"press": name, "kwargs": {...}} -> the kvpress object (nested press specs built first)."""
    import kvpress

    kw = {k: build(v) if isinstance(v, dict) and "press" in v else v for k, v in spec.get("kwargs", {}).items()}
    return getattr(kvpress, spec["press"])(**kw)


def greedy(model, cache, logits, n: int, pos: int) -> list[int]:
    """n greedy tokens from the prefill's last logits; explicit positions (a pruned cache is shorter than pos)."""
    out = [int(logits[0, -1].argmax())]
    with torch.inference_mode():
        while len(out) < n:
            step = model(input_ids=torch.tensor([[out[-1]]]), position_ids=torch.tensor([[pos]]),
                         past_key_values=cache, use_cache=True)
            pos += 1
            out.append(int(step.logits[0, -1].argmax()))
    return out


def run_press(model, ids: list[int], p: dict) -> tuple[dict, list]:
    """One press: prefill (and decode) with it; the masked positions per layer when it masks, the greedy tokens."""
    from transformers import DynamicCache

    for layer in model.model.layers:  # a previous press's masks must not leak into this one
        layer.self_attn.masked_key_indices = None
    press = build(p)
    if "pattern" in p:  # DuoAttentionPress without the network: its pattern loader returns the request's gates
        import numpy as np

        pat = p["pattern"]
        type(press).load_attention_pattern = staticmethod(
            lambda model: (pat["sink_size"], pat["recent_size"], np.array(pat["head_scores"], dtype=float)))
    cache = DynamicCache(config=model.config)
    n_gen, during = p.get("generate", 0), p.get("decode") == "decoding"
    with torch.inference_mode():
        with press(model):
            out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
            tokens = greedy(model, cache, out.logits, n_gen, len(ids)) if n_gen and during else None
        if n_gen and not during:
            masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
            masks = [None if m is None else tuple(t.clone() for t in m) for m in masks]
            tokens = greedy(model, cache, out.logits, n_gen, len(ids))
        else:
            masks = [getattr(layer.self_attn, "masked_key_indices", None) for layer in model.model.layers]
    res = {"tokens": tokens} if n_gen else {}
    if n_gen:
        res["final_keys"] = [layer.keys[0].tolist() for layer in cache.layers]
    return res, masks, [layer.keys.clone() for layer in cache.layers]


def match(full: torch.Tensor, kept: torch.Tensor) -> tuple[list[list[int]], float]:
    """full: [1, H, n, D], kept: [1, H, k, D] -> per head the sorted full positions of the kept keys, worst distance."""
    out, worst = [], 0.0
    for h in range(full.shape[1]):
        d = torch.cdist(kept[0, h].double(), full[0, h].double())  # [k, n]
        best = d.min(-1)
        worst = max(worst, float(best.values.max()))
        out.append(sorted(best.indices.tolist()))
    return out, worst


def main() -> None:
    import kvpress
    import transformers
    from transformers import AutoModelForCausalLM

    req = json.load(open(sys.argv[1]))
    out = {"versions": {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else
                        __import__("importlib.metadata").metadata.version("kvpress"),
                        "transformers": transformers.__version__, "torch": torch.__version__}}
    models = {}
    for p in req["presses"]:
        attn = p.get("attn", "sdpa")
        if attn not in models:
            m = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=torch.float32, attn_implementation=attn)
            models[attn] = (m.eval(), prefill(m.eval(), req["ids"]))
        model, full = models[attn]
        if "ids" in p and p.get("decode") != "decoding":
            raise ValueError(f"press {p['name']}: own ids only for decoding presses (kept sets match req ids)")
        res, masks, kept = run_press(model, p.get("ids", req["ids"]), p)
        layers, worst = [], 0.0
        if any(m is not None for m in masks):  # head-wise presses mask instead of dropping
            n = len(req["ids"])
            for f, m in zip(full, masks):
                drop = [set() for _ in range(f.shape[1])]
                if m is not None:
                    for h, i in zip(m[1].tolist(), m[2].tolist()):
                        drop[h].add(i)
                layers.append([[i for i in range(n) if i not in d] for d in drop])
        elif p.get("decode") != "decoding":
            for f, k in zip(full, kept):
                pos, w = match(f, k)
                layers.append(pos)
                worst = max(worst, w)
        out[p["name"]] = {"kept": layers, "max_match_dist": worst, "masked": any(m is not None for m in masks), **res}
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
