"""The smollm2-135m-probe model: adapter loading (own LoRA merge, no peft, no network) and a CI regression slice.

The slice (scripts/probe/ci_slice.py) re-runs a few cells of the all-methods reference table
(results/reference/all_methods_probe.json, made by `scbench run -m sweep=reference`) on CPU, composed from the same
preset, and fails when a cell's run id is not the table's (the preset changed) or a per-turn score moves by more
than ci_slice.TOLERANCE (25 points: any flipped answer of 2 examples).
"""
from __future__ import annotations

import json

import pytest
import torch

from support import ROOT, load_script, random_llama

ADAPTER = ROOT / "models" / "smollm2-135m-probe"
REFERENCE = ROOT / "results" / "reference" / "all_methods_probe.json"
ci_slice = load_script("probe/ci_slice.py")


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

    from scbench.engines.models import merge_adapter

    model = random_llama(64, hidden=32, intermediate=48, window=64).eval()
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
    from scbench.engines.models import merge_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "peft", "rank": 4, "alpha": 8}))
    model = random_llama(64, layers=1, hidden=32, intermediate=48)
    with pytest.raises(ValueError, match="format"):
        merge_adapter(model, tmp_path)


def test_slice_cells_are_in_the_table():
    """Every cell of the slice composes to a spec whose run id is a finished row of the table (no model needed)."""
    from scbench.run import run_id_of

    table = json.loads(REFERENCE.read_text())
    rows = {r["run_id"]: r for r in table["runs"]}
    assert table["adapter_sha256"] and table["device"] == "cpu" and table["dtype"] == "float32"
    for cell in ci_slice.CELLS:
        run_id = run_id_of(ci_slice.cell_spec(*cell))
        assert run_id in rows, f"{cell}: run id {run_id} not in {REFERENCE.name}: rerun the reference sweep"
        assert rows[run_id]["status"] == "done" and [rows[run_id][k] for k in ("task", "mode")] == list(cell[:2])


def test_compare_flags_a_moved_score():
    table = {"runs": [{"run_id": "r1", "per_turn": [100.0, 50.0], "predictions": [["0", 0, "a"], ["0", 1, "b"]]}]}
    same = {"r1": {"cell": ["t", "m", "x"], "per_turn": [100.0, 50.0], "predictions": [["0", 0, "a"], ["0", 1, "b"]]}}
    assert ci_slice.compare(same, table) == []
    moved = {"r1": {"cell": ["t", "m", "x"], "per_turn": [100.0, 0.0], "predictions": [["0", 0, "a"], ["0", 1, "c"]]}}
    (msg,) = ci_slice.compare(moved, table)
    assert "turn 2" in msg and "'c'" in msg
    (msg,) = ci_slice.compare({"r9": same["r1"]}, table)
    assert "not in the table" in msg


@pytest.mark.slow
def test_probe_slice_matches_reference():
    from scbench.run import get_engine

    table = json.loads(REFERENCE.read_text())
    engine = get_engine(ci_slice.cpu_model())
    assert engine.describe()["adapter_sha256"] == table["adapter_sha256"], "the adapter changed: rerun the table"
    got = ci_slice.run_slice(engine)
    assert len(got) == len(ci_slice.CELLS)
    problems = ci_slice.compare(got, table)
    assert not problems, "\n".join(problems)
