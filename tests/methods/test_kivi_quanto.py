"""Cross-check KIVI against an independent implementation of the same scheme: transformers' QuantizedCache with the
optimum-quanto backend (keys per channel: axis -1, values per token: axis 0, min/max affine, group G).

The quanto side runs in .venv-kvpress (`make kvpress-env`; transformers 5.2.0 + optimum-quanto 0.2.7) in a subprocess
(tests/reference/quanto_side.py). Two checks, at 2 and 4 bits, group 32:
  - de-quantised tensors: the prefill keys and values of every layer, quantized and dequantized by both; they must
    be equal up to float rounding (the same formula q = round((x - min) / scale), x' = q * scale + min);
  - greedy outputs: with our residual=0 and a prompt of a multiple of G tokens, both caches quantize the whole prompt
    and then one group of G new tokens whenever G have gathered (transformers re-quantizes the whole cache then, but
    re-quantizing the dequantized older groups is exact), and attention sees the newest ones exact: same tokens.
Differences explained, not tested here: with residual > 0 (KIVI's default 32) we keep the most recent tokens exact
after the prefill, transformers' cache quantizes the whole prompt; its re-quantization of everything every G tokens
costs O(n) per G steps, ours quantizes only the new group. Skips / failures as in test_compression_kvpress.py.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from support import byte_tokenizer, make_tiny_engine, reference_python

from scbench.kv.quant import dequantize, quantize, value_group
from scbench.methods.full import FullAttention
from scbench.methods.kivi import KIVI

ROOT = Path(__file__).resolve().parents[2]
SIDE = ROOT / "tests" / "reference" / "quanto_side.py"
GROUP = 32



def tiny_engine(head_dim: int = 32, layers: int = 2):
    """A random Llama with head_dim 32, so a value group of 32 channels is one head on both sides."""
    engine = make_tiny_engine(byte_tokenizer(), layers=layers, hidden=4 * head_dim, intermediate=256)
    with torch.no_grad():  # larger logits: the greedy path depends on the cache (random init is near uniform)
        engine.model.lm_head.weight.mul_(20.0)
    return engine


def cross_check(engine, ids: list[int], bits: int, new_tokens: int, tmp: Path) -> dict:
    from safetensors.torch import load_file, save_file

    s = engine.session(FullAttention())
    s.feed(ids, compress=False, sparse=False)
    tensors = {f"{i}.{kind}": getattr(layer, kind).contiguous() for i, layer in enumerate(s.cache.layers)
               for kind in ("keys", "values")}
    save_file(tensors, str(tmp / "kv.safetensors"))
    engine.model.save_pretrained(tmp / "model")
    req = {"bits": bits, "group": GROUP, "tensors": str(tmp / "kv.safetensors"), "model_dir": str(tmp / "model"),
           "ids": ids, "new_tokens": new_tokens}
    (tmp / "req.json").write_text(json.dumps(req))
    proc = subprocess.run([reference_python(), str(SIDE), str(tmp / "req.json"), str(tmp)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        pytest.fail(f"quanto side failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    theirs, ref = load_file(str(tmp / "dequantized.safetensors")), json.loads((tmp / "out.json").read_text())

    report = {"bits": bits, "group": GROUP, "tokens": len(ids), "versions": ref["versions"], "equal_share": 1.0,
              "max_diff_in_steps": 0.0}
    for name, x in tensors.items():
        keys = name.endswith(".keys")
        g = GROUP if keys else value_group(GROUP, x.shape[-1])
        axis = -2 if keys else -1
        packed, scale, zero = quantize(x, bits, g, axis)
        ours = dequantize(packed, scale, zero, bits, g, axis, x.dtype)
        step = (scale.unsqueeze(-2).expand(*scale.shape[:-2], scale.shape[-2], g, -1).flatten(-3, -2) if keys
                else scale.repeat_interleave(g, -1))
        diff = (ours - theirs[name]).abs()
        report["equal_share"] = min(report["equal_share"], float((diff <= 1e-5 * x.abs().max()).float().mean()))
        report["max_diff_in_steps"] = max(report["max_diff_in_steps"], float((diff / step.clamp_min(1e-12)).max()))
    k = engine.session(KIVI(bits=bits, group=GROUP, residual=0))
    k.feed(ids, compress=True, sparse=False)
    ours_tokens = k.generate(new_tokens).tokens
    report |= {"ours": ours_tokens, "theirs": ref["tokens"], "full": ref["tokens_full"]}
    return report


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_matches_transformers_quanto_cache(tmp_path, bits):
    engine = tiny_engine()
    ids = torch.randint(0, 256, (8 * GROUP,), generator=torch.Generator().manual_seed(1)).tolist()
    report = cross_check(engine, ids, bits, new_tokens=2 * GROUP + 8, tmp=tmp_path)
    print(json.dumps(report))
    assert report["equal_share"] >= 0.999, report  # same formula: float rounding only
    assert report["max_diff_in_steps"] <= 1.0 + 1e-4, report  # a rounding tie resolved the other way at worst
    ours, theirs = report["ours"], report["theirs"]
    assert len(ours) >= GROUP + 2, report  # past one flush of a decoded group (ours stops at a stop token)
    assert ours == theirs[: len(ours)], report
    assert ours != report["full"][: len(ours)], report  # the quantization changed the greedy path: a real test


@pytest.mark.slow
def test_kivi_matches_quanto_on_embedded_model(tmp_path, embedded_engine):
    text = " ".join(p.read_text() for p in sorted((ROOT / "methods").glob("*.py")))
    ids = embedded_engine.encode(text, add_special_tokens=False)[: 16 * GROUP]
    report = cross_check(embedded_engine, ids, 4, new_tokens=GROUP + 8, tmp=tmp_path)
    print(json.dumps(report))
    assert report["equal_share"] >= 0.999 and report["max_diff_in_steps"] <= 1.0 + 1e-4, report
    ours, theirs = report["ours"], report["theirs"]
    assert ours == theirs[: len(ours)], report  # 40 of 40 tokens equal on SmolLM2 at 4 bits
