"""The optimum-quanto side of the KIVI cross-check: runs in .venv-kvpress, never imports scbench.

    .venv-kvpress/bin/python tests/reference/quanto_side.py REQUEST.json OUT_DIR

REQUEST: {"bits": 2 | 4, "group": G, "tensors": a safetensors file of [B, H, T, D] tensors named "<layer>.keys" /
"<layer>.values", "model_dir": a save_pretrained folder or null, "ids": [...], "new_tokens": N}.
Writes OUT_DIR/dequantized.safetensors: each tensor quantized and dequantized by transformers' QuantoQuantizedLayer
the KIVI way (keys axis -1: a group is G consecutive tokens of one channel; values axis 0: G consecutive channels of
one token; min/max affine, optimum-quanto's MaxOptimizer), and OUT_DIR/out.json: {"versions", "tokens": greedy ids
generated with transformers' QuantizedCache(backend="quanto", axis_key=-1, axis_value=0, q_group_size=G,
residual_length=G), "tokens_full": the same with a DynamicCache}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def greedy(model, ids, n, cache) -> list[int]:
    out = []
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits
        for _ in range(n):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            logits = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits
    return out


def main() -> None:
    import optimum.quanto
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, DynamicCache, QuantizedCache
    from transformers.cache_utils import QuantoQuantizedLayer

    req = json.load(open(sys.argv[1]))
    out_dir = Path(sys.argv[2])
    bits, g = req["bits"], req["group"]
    layer = QuantoQuantizedLayer(nbits=bits, axis_key=-1, axis_value=0, q_group_size=g, residual_length=g)
    deq = {}
    for name, t in load_file(req["tensors"]).items():
        axis = -1 if name.endswith(".keys") else 0
        deq[name] = layer._dequantize(layer._quantize(t.contiguous(), axis=axis)).contiguous()
    save_file(deq, str(out_dir / "dequantized.safetensors"))
    res = {"versions": {"transformers": transformers.__version__, "optimum-quanto": optimum.quanto.__version__,
                        "torch": torch.__version__}}
    if req.get("model_dir"):
        model = AutoModelForCausalLM.from_pretrained(req["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
        model.eval()
        cache = QuantizedCache(backend="quanto", config=model.config, nbits=bits, axis_key=-1, axis_value=0,
                               q_group_size=g, residual_length=g)
        res["tokens"] = greedy(model, req["ids"], req["new_tokens"], cache)
        res["tokens_full"] = greedy(model, req["ids"], req["new_tokens"], DynamicCache(config=model.config))
    (out_dir / "out.json").write_text(json.dumps(res))


if __name__ == "__main__":
    main()
