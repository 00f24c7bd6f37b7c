"""The kvpress side of the cross-check: runs in the kvpress environment (.venv-kvpress), never imports scbench.

    .venv-kvpress/bin/python tests/reference/kvpress_side.py REQUEST.json OUT.json

REQUEST: {"model_dir": a save_pretrained folder (float32 Llama), "ids": [token ids], "presses": [{"name": label,
"press": kvpress class name, "kwargs": {...}, "attn": "sdpa" | "eager"}]}. For every press, one prefill of ``ids``
with the press applied (kvpress's forward hooks, a plain transformers DynamicCache); the kept positions per layer and
KV head are recovered by matching each kept key with the nearest key of an uncompressed prefill of the same ids
(compression happens after each layer's attention, so the uncompressed keys are the ones the press saw).
OUT: {"versions": {...}, "<label>": {"kept": [layer][head] -> sorted positions, "max_match_dist": float}}.
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
        press = getattr(kvpress, p["press"])(**p["kwargs"])
        kept = prefill(model, req["ids"], press)
        layers, worst = [], 0.0
        for f, k in zip(full, kept):
            pos, w = match(f, k)
            layers.append(pos)
            worst = max(worst, w)
        out[p["name"]] = {"kept": layers, "max_match_dist": worst}
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
