"""The smollm2-135m-probe model: adapter loading (own LoRA merge, no peft, no network) and a CI regression slice.

The slice (scripts/probe/ci_slice.py: scbench_kv at ~1K tokens, 2 examples x 3 turns, multi-turn, full attention
and StreamingLLM) is re-run on CPU and compared with results/reference/probe_ci_slice.json, which the same code
wrote. A per-turn score that moves by more than the reference's ``tolerance`` (25 points) fails the test.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "models" / "smollm2-135m-probe"
REFERENCE = ROOT / "results" / "reference" / "probe_ci_slice.json"
sys.path.insert(0, str(ROOT / "scripts" / "probe"))


def test_adapter_files_are_small_and_well_formed():
    from scbench.engines.models import ADAPTER_FORMAT, load_adapter

    assert (ADAPTER / "adapter.safetensors").stat().st_size <= 20_000_000
    assert (ADAPTER / "README.md").exists()
    cfg, tensors = load_adapter(ADAPTER)
    assert cfg["format"] == ADAPTER_FORMAT and cfg["base"] == "embedded:smollm2"
    assert len(tensors) == 2 * 7 * 30  # A and B for 7 projections in 30 layers
    assert all(t.dtype in (torch.float16, torch.bfloat16) for t in tensors.values())


def test_merge_equals_unmerged_lora(tmp_path):
    """W + scale * B @ A merged into the weights gives the same logits as applying the LoRA on the side."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from scbench.engines.models import merge_adapter

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    rank, alpha = 4, 8.0
    tensors, side = {}, {}
    for name, mod in model.named_modules():
        if name.endswith(("q_proj", "v_proj", "down_proj")):
            a = torch.randn(rank, mod.in_features).half() * 0.1
            b = torch.randn(mod.out_features, rank).half() * 0.1
            tensors[name + ".lora_A"], tensors[name + ".lora_B"] = a, b
            side[name] = (a.float(), b.float())
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"format": "scbench-lora-v1", "base": "test", "rank": rank, "alpha": alpha}))
    ids = torch.randint(0, 64, (1, 10))
    hooks = [
        mod.register_forward_hook(lambda m, inp, out, ab=side[name]: out + inp[0] @ ab[0].T @ ab[1].T * (alpha / rank))
        for name, mod in model.named_modules() if name in side
    ]
    with torch.no_grad():
        want = model(ids).logits
    for h in hooks:
        h.remove()
    info = merge_adapter(model, tmp_path)
    with torch.no_grad():
        got = model(ids).logits
    assert info["adapter_modules"] == 6  # 3 projections x 2 layers
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_bad_adapter_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from scbench.engines.models import merge_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "peft", "rank": 4, "alpha": 8}))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="format"):
        merge_adapter(model, tmp_path)


@pytest.mark.slow
def test_probe_slice_matches_reference():
    import ci_slice

    from scbench.evaluate import get_engine

    ref = json.loads(REFERENCE.read_text())
    assert ref["slice"] == ci_slice.SLICE and ref["model"] == ci_slice.PROBE, "reference was made for another slice"
    engine = get_engine(dict(ci_slice.PROBE))
    assert engine.describe()["adapter_sha256"] == ref["adapter_sha256"], "the adapter changed: regenerate the reference"
    got = ci_slice.run_slice(engine)
    tol = ref["tolerance"]
    for method, want in ref["scores"].items():
        for turn, (a, b) in enumerate(zip(got[method]["per_turn"], want["per_turn"])):
            assert abs(a - b) <= tol, (
                f"{method} turn {turn}: score {a} vs reference {b} (tolerance {tol}); "
                f"predictions {got[method]['predictions']} vs {want['predictions']}"
            )
