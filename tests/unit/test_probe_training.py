"""The probe adapter's training script: the padded micro-batch loss (fast path) against the one-sequence loss
(plain reference), micro-batching, the v2 data plan and the chat rows (scripts/probe/)."""
from __future__ import annotations

import random

import pytest
import torch

from support import load_script, random_llama

probe_data = load_script("probe/probe_data.py")
train_probe = load_script("probe/train_probe.py")


@pytest.fixture(scope="module")
def tiny_lora_model():
    model = random_llama(97, hidden=32, intermediate=48, window=256, attn_implementation="sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = train_probe.add_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():  # B starts at zero in training; random here so that the LoRA path matters
        for m in wrapped.values():
            m.lora_B.normal_(0, 0.2)
    return model, wrapped


def _random_seqs(rng: random.Random, n: int):
    seqs = []
    for _ in range(n):
        length = rng.randint(5, 120)
        ids = [rng.randrange(97) for _ in range(length)]
        lab = [-100] * length
        for j in rng.sample(range(1, length), rng.randint(1, max(1, length // 4))):
            lab[j] = ids[j]
        seqs.append((ids, lab))
    return seqs


def test_batch_loss_equals_sum_of_sequence_losses(tiny_lora_model):
    model, wrapped = tiny_lora_model
    rng = random.Random(3)
    dev = torch.device("cpu")
    for trial in range(3):
        seqs = _random_seqs(rng, 5)
        ref = sum(train_probe.seq_loss(model, ids, lab, dev) for ids, lab in seqs)
        fast = train_probe.batch_loss(model, seqs, dev)
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    # and the gradients of the LoRA parameters agree too
    seqs = _random_seqs(rng, 4)
    params = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
    grads = []
    for fn in (lambda: sum(train_probe.seq_loss(model, i, l, dev) for i, l in seqs),
               lambda: train_probe.batch_loss(model, seqs, dev)):
        for p in params:
            p.grad = None
        fn().backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_micro_batches_respect_the_token_cap():
    rng = random.Random(1)
    window = [(k, {}, [0] * rng.randint(10, 900), []) for k in range(64)]
    mbs = train_probe.micro_batches(window, max_tokens=2000, max_seqs=8)
    assert sorted(r[0] for mb in mbs for r in mb) == list(range(64))
    for mb in mbs:
        longest = max(len(r[2]) for r in mb)
        assert len(mb) <= 8 and (len(mb) == 1 or len(mb) * longest <= 2000)


def test_v2_plan_is_deterministic_and_disjoint_from_evaluation_seeds():
    items = [probe_data.plan_item(k, "v2") for k in range(2400, 3400)]
    assert items == [probe_data.plan_item(k, "v2") for k in range(2400, 3400)]
    probe_data.check_disjoint([it["seed"] for it in items])
    tasks = {it["task"] for it in items}
    assert {"scbench_vt", "scbench_kv", "scbench_prefix_suffix", "chat_distill"} <= tasks
    share_vt = sum(it["task"] == "scbench_vt" for it in items) / len(items)
    assert 0.2 < share_vt < 0.36
    with pytest.raises(AssertionError, match="overlap"):
        probe_data.check_disjoint([probe_data.TRAIN_SEED_BASE + 5], {probe_data.TRAIN_SEED_BASE + 5})


def test_chat_rows_hold_out_the_evaluation_questions_and_drop_loops(tmp_path):
    import json

    eval_probe = load_script("probe/eval_probe.py")
    rows = probe_data.chat_rows()
    assert len(rows) >= 20
    questions = {r["question"].lower() for r in rows}
    assert not questions & {q.lower() for q in eval_probe.CHAT}
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"rows": [{"question": "a", "answer": "of the balcony " * 6},
                                      {"question": "b", "answer": "Rome is the capital of Italy."}]}))
    assert [r["question"] for r in probe_data.chat_rows(f)] == ["b"]


def test_state_round_trips_with_tensors_only_and_refuses_pickled_objects(tmp_path, tiny_lora_model):
    """The resume checkpoint is read with weights_only=True: a state holding an arbitrary object is refused."""
    import pickle

    import train_probe

    _, wrapped = tiny_lora_model
    params = [p for m in wrapped.values() for p in (m.lora_A, m.lora_B)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    lora = {f"{n}.{w}": getattr(m, w).detach() for n, m in wrapped.items() for w in ("lora_A", "lora_B")}
    progress = {"step": 3, "next_k": 7, "losses": [1.5, 1.25], "train_seconds": 2.0}
    path = tmp_path / "state.pt"
    train_probe.save_state(path, lora, opt.state_dict(), progress, {"mixture": "v2", "steps": 10, "state": str(path)})
    st = train_probe.load_state(path, torch.device("cpu"))
    assert st["progress"] == progress and st["args"]["mixture"] == "v2"
    assert all(torch.equal(st["lora"][k], v) for k, v in lora.items())
    opt.load_state_dict(st["opt"])

    class Payload:
        def __reduce__(self):
            return (print, ("arbitrary code ran",))

    torch.save({"lora": lora, "progress": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        train_probe.load_state(tmp_path / "evil.pt", torch.device("cpu"))
