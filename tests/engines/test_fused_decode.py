"""The fused decode step (scbench/engines/fuse.py, scbench/kernels/fused.py) against the modules it replaces.

Each fused op's torch reference is checked against the Hugging Face modules' own computation, each Triton kernel
against its reference in Triton's CPU interpreter (skipped without triton), and whole decodes: the fused static
path gives the unfused one's (and the plain loop's) greedy tokens and cache in float32, for Llama and Qwen2
(biased q/k/v), with eviction and a decode plugin; modules it does not recognise keep their own forwards.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from scbench.engines import fastdecode, fuse
from scbench.kernels import fused
from scbench.registry import METHODS

from support import make_tiny_engine, random_llama

HERE = os.path.dirname(os.path.abspath(__file__))


def test_references_equal_the_llama_modules():
    from transformers.models.llama import modeling_llama as ml

    torch.manual_seed(0)
    model = random_llama(50, layers=1, hidden=64, heads=4, kv_heads=2, intermediate=96)
    layer = model.model.layers[0]
    x, r = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    norm = layer.input_layernorm
    norm.weight.data.normal_()
    torch.testing.assert_close(fused.rmsnorm_ref(x, norm.weight, norm.variance_epsilon), norm(x), rtol=0, atol=0)
    out, res = fused.rmsnorm_ref(x, norm.weight, norm.variance_epsilon, residual=r)
    torch.testing.assert_close(res, r + x, rtol=0, atol=0)
    torch.testing.assert_close(out, norm(r + x), rtol=0, atol=0)
    mlp = layer.mlp
    gu = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1)
    torch.testing.assert_close(mlp.down_proj(fused.silu_mul_ref(gu)), mlp(x), rtol=1e-6, atol=1e-6)
    a = layer.self_attn
    qkv = torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1)
    cos, sin = model.model.rotary_emb(x, torch.tensor([[7]]))
    kb, vb = torch.zeros(1, 2, 12, 16), torch.zeros(1, 2, 12, 16)
    q = fused.rope_store_ref(qkv, cos, sin, kb, vb, torch.tensor([5]), 4, 2)
    hs = lambda t: t.view(1, 1, -1, 16).transpose(1, 2)  # noqa: E731
    want_q, want_k = ml.apply_rotary_pos_emb(hs(a.q_proj(x)), hs(a.k_proj(x)), cos, sin)
    torch.testing.assert_close(q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(kb[:, :, 5:6], want_k, rtol=0, atol=0)
    torch.testing.assert_close(vb[:, :, 5:6], hs(a.v_proj(x)), rtol=0, atol=0)
    assert kb[:, :, :5].abs().sum() == 0 and kb[:, :, 6:].abs().sum() == 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
@pytest.mark.cpu_kernels  # its process runs the kernels through use_triton
def test_triton_kernels_in_the_interpreter():
    """Run ``_kernels_check`` in a subprocess with TRITON_INTERPRET=1 (the interpreter is chosen at import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fused_kernels_check.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout


def test_unmarked_tests_take_the_references():
    """tests/conftest.py: a test neither marked ``cpu_kernels`` nor using the ``interpreted`` fixtures decodes through
    the references, and so do the processes it starts (unless the suite was started with SCBENCH_CPU_KERNELS=1)."""
    if os.environ["SCBENCH_CPU_KERNELS"] != "0":
        pytest.skip("the suite runs with SCBENCH_CPU_KERNELS=1")
    assert fused.CPU_KERNELS is False and not fused.use_triton(torch.zeros(1))


@pytest.mark.cpu_kernels
def test_marked_tests_keep_the_kernels():
    assert os.environ["SCBENCH_CPU_KERNELS"] == "1" and fused.CPU_KERNELS == fused.INTERPRET
    assert fused.use_triton(torch.zeros(1)) == (fused.INTERPRET and fused.triton is not None)


@pytest.mark.skipif(fused.triton is None, reason="needs Triton")
@pytest.mark.parametrize("flag,want", [(None, "True"), ("1", "True"), ("0", "False")])
def test_cpu_kernels_flag(flag, want):
    """Under the interpreter CPU tensors take the kernels unless SCBENCH_CPU_KERNELS=0 (read at import)."""
    env = {k: v for k, v in os.environ.items() if k != "SCBENCH_CPU_KERNELS"}
    env.update({"TRITON_INTERPRET": "1", **({"SCBENCH_CPU_KERNELS": flag} if flag is not None else {})})
    code = "import torch; from scbench.kernels import fused, shared_prefix; x = torch.zeros(1); " \
           "print(fused.CPU_KERNELS, fused.use_triton(x), shared_prefix.available(x))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == [want] * 3, out.stderr[-2000:]


def _decode(engine, cfg, enabled, monkeypatch, turns=((None, 24), (30, 10))):
    monkeypatch.setattr(fuse, "ENABLED", enabled)
    engine.decode_mode = "fast"
    try:
        method = METHODS.get(cfg["name"])(**{k: v for k, v in cfg.items() if k != "name"})
        session = engine.session(method)
        ids = torch.randint(3, 250, (300,), generator=torch.Generator().manual_seed(1)).tolist()
        toks = []
        for cut, n in turns:
            session.feed(ids[:cut] if cut else ids, compress=not toks, sparse=False)
            gen = session.generate(n)
            assert gen.decode_path == "static"
            toks.append(gen.tokens)
        return toks, [layer.keys.clone() for layer in session.cache.layers], session.decoder
    finally:
        engine.decode_mode = "auto"


@pytest.mark.parametrize("cfg", [{"name": "full"}, {"name": "pyramidkv", "budget": 48},
                                 {"name": "quest", "budget": 64, "page_size": 16}],
                         ids=["full", "pyramidkv", "quest-plugin"])
@pytest.mark.cpu_kernels  # under the interpreter the fused step runs its Triton kernels
def test_fused_static_decode_equals_unfused(smol_tokenizer, cfg, monkeypatch):
    engine = make_tiny_engine(smol_tokenizer, layers=3)
    plain, plain_keys, dec0 = _decode(engine, cfg, False, monkeypatch)
    got, keys, dec = _decode(engine, cfg, True, monkeypatch)
    assert dec0.plan is None and dec.plan.fused_count() == {"layers": 3, "whole_layers": 3, "attention": 3, "mlp": 3,
                                                           "norms": 7}
    assert got == plain
    for a, b in zip(keys, plain_keys):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for mod in engine.model.modules():  # every patched forward was restored
        assert "forward" not in vars(mod)


def test_a_moved_model_gets_a_new_plan(smol_tokenizer, monkeypatch):
    """model.to(...) after the plan was built: the fused forwards must not keep computing with the old buffers."""
    engine = make_tiny_engine(smol_tokenizer, layers=2)
    plan = fuse.prepare(engine.model)
    engine.model.to(torch.float64)
    assert plan.stale()
    with fuse.active(engine.model, plan) as used:
        assert used is not plan and not used.stale()
        x = torch.randn(1, 1, 64, dtype=torch.float64)
        assert engine.model.model.layers[0].mlp(x).dtype == torch.float64
    assert fuse.prepare(engine.model) is used


def test_fused_weights_are_views(smol_tokenizer):
    engine = make_tiny_engine(smol_tokenizer, layers=2)
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    plan = fuse.prepare(engine.model)
    assert fuse.prepare(engine.model) is plan
    for n, p in engine.model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)
    for a, (w, _) in plan.attn.items():
        assert a.q_proj.weight.data_ptr() == w.data_ptr()
        assert a.v_proj.weight.data_ptr() == w.data_ptr() + (w.shape[0] - a.v_proj.weight.shape[0]) * w.stride(0) * 4


def test_unrecognised_modules_keep_their_forward(smol_tokenizer, monkeypatch):
    """A hooked MLP and a norm computing something else (Gemma's 1 + w) are left alone; decoding still matches."""
    engine = make_tiny_engine(smol_tokenizer, layers=2)
    model = engine.model
    model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    norm = model.model.layers[1].post_attention_layernorm

    class OnePlus(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight, self.variance_epsilon = n.weight, n.variance_epsilon

        def forward(self, x):
            return fused.rmsnorm_ref(x, 1 + self.weight, self.variance_epsilon)

    model.model.layers[1].post_attention_layernorm = OnePlus(norm)
    plan = fuse.prepare(model)
    assert plan.fused_count() == {"layers": 2, "whole_layers": 0, "attention": 2, "mlp": 1, "norms": 4}
    a, _, _ = _decode(engine, {"name": "full"}, False, monkeypatch)
    b, _, _ = _decode(engine, {"name": "full"}, True, monkeypatch)
    assert a == b


def test_qwen2_with_qkv_bias(smol_tokenizer, monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scbench.engines.hf import HFEngine

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(cfg)
    for a in (layer.self_attn for layer in model.model.layers):
        assert a.q_proj.bias is not None
        a.q_proj.bias.data.normal_(), a.k_proj.bias.data.normal_(), a.v_proj.bias.data.normal_()
    engine = HFEngine("tiny-qwen2", model=model, tokenizer=smol_tokenizer, device="cpu", dtype="float32")
    a, ka, _ = _decode(engine, {"name": "full"}, False, monkeypatch)
    b, kb, dec = _decode(engine, {"name": "full"}, True, monkeypatch)
    assert dec.plan.fused_count()["whole_layers"] == 2
    assert a == b
    for x, y in zip(ka, kb):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_disabled_by_flag(smol_tokenizer, monkeypatch):
    engine = make_tiny_engine(smol_tokenizer, layers=1)
    monkeypatch.setattr(fuse, "ENABLED", False)
    assert fastdecode.FastDecoder(engine.model, torch.device("cpu")).fused is False
    assert fastdecode.FastDecoder(engine.model, torch.device("cpu"), fused=True).fused is True


@pytest.mark.parametrize("built_in_inference", [True, False])
def test_fused_weights_keep_the_parameters_usable(built_in_inference):
    """Weights made under inference mode (or not) stay callable in and out of it once they are views."""
    with torch.inference_mode(built_in_inference):
        a, b = nn.Linear(8, 4), nn.Linear(8, 6)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        want = torch.cat([a(x), b(x)], -1)
        w, bias = fuse._fuse_weights([a, b])
        # one GEMM of width 10 vs two of 4 and 6: the CPU BLAS may pick other kernels (sums in another order)
        torch.testing.assert_close(torch.nn.functional.linear(x, w, bias), want, rtol=1e-5, atol=1e-6)
    assert a.weight.data_ptr() == w.data_ptr()
    with torch.inference_mode(built_in_inference):
        torch.testing.assert_close(torch.cat([a(x), b(x)], -1), want, rtol=0, atol=0)


def test_what_a_fused_step_launches(smol_tokenizer, monkeypatch):
    """Per layer: 2 norms (the second with the residual add), 1 rotary+KV write, 1 SiLU*up, 4 GEMMs, 1 attend;
    the closing residual add rides in the next norm (no tensor add left in the layers)."""
    engine = make_tiny_engine(smol_tokenizer, layers=3)
    calls = []
    for name in ("rmsnorm", "silu_mul", "rope_store"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append("gemm") or real_linear(*a, **k))
    real_attend = fastdecode.StaticKV.attend
    monkeypatch.setattr(fastdecode.StaticKV, "attend", lambda *a, **k: calls.append("attend") or real_attend(*a, **k))
    session = engine.session(METHODS.get("full")())
    session.feed(list(range(5, 60)), compress=False, sparse=False)
    dec = fastdecode.FastDecoder(engine.model, torch.device("cpu"), use_graph=False, fused=True)
    calls.clear()
    dec.generate(session.cache, session.pos, 7, 2, set())  # one step
    layer = ["rmsnorm", "gemm", "rope_store", "attend", "gemm", "rmsnorm", "gemm", "silu_mul", "gemm"]
    assert calls == layer * 3 + ["rmsnorm", "gemm"]  # + the final norm and lm_head


def test_active_is_reentrant_and_restores(smol_tokenizer):
    engine = make_tiny_engine(smol_tokenizer, layers=1)
    layer = engine.model.model.layers[0]
    with fuse.active(engine.model):
        assert "forward" in vars(layer)
        with fuse.active(engine.model):
            pass
        assert "forward" in vars(layer)  # the inner exit left the outer's patches
    assert "forward" not in vars(layer)
    with pytest.raises(RuntimeError), fuse.active(engine.model):
        raise RuntimeError("inside")
    assert "forward" not in vars(layer) and not fuse.prepare(engine.model).active


@pytest.mark.skipif(not torch.cuda.is_available() or fused.triton is None, reason="needs CUDA and Triton")
def test_fused_kernels_on_cuda():
    """The Triton kernels against their references on CUDA tensors (8B shapes included), float32 and bf16."""
    spec = importlib.util.spec_from_file_location("fused_kernels_check", os.path.join(HERE, "fused_kernels_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main() >= 30  # every kernel x shape x dtype compared with its reference


@pytest.mark.skipif(not torch.cuda.is_available() or fused.triton is None, reason="needs CUDA and Triton")
def test_fused_graph_decode_equals_unfused_on_cuda(monkeypatch):
    """CUDA graph decode, fused vs unfused: float32 greedy tokens equal; bf16 one-step logits close."""
    from scbench.engines.hf import HFEngine
    from support import byte_tokenizer

    tok = byte_tokenizer()
    for dtype in ("float32", "bfloat16"):
        model = random_llama(len(tok), layers=3, hidden=256, heads=8, kv_heads=2, intermediate=512,
                             eos_token_id=tok.eos_token_id).to(getattr(torch, dtype))
        engine = HFEngine("tiny-random-llama", model=model, tokenizer=tok, device="cuda", dtype=dtype)
        runs = {}
        for enabled in (False, True):
            monkeypatch.setattr(fuse, "ENABLED", enabled)
            engine.decode_mode = "fast"
            session = engine.session(METHODS.get("full")())
            session.feed(list(range(3, 200)), compress=False, sparse=False)
            gen = session.generate(40)
            assert gen.decode_path == "graph"
            session2 = engine.session(METHODS.get("full")())
            session2.feed(list(range(3, 200)), compress=False, sparse=False)
            with torch.inference_mode():
                dec = fastdecode.FastDecoder(engine.model, engine.device, use_graph=False)
                dec._prepare(session2.cache, 2)
                dec.tok.fill_(5)
                dec.pos.fill_(session2.pos)
                runs[enabled] = (gen.tokens, dec._logits()[0, -1].float())
        if dtype == "float32":
            assert runs[True][0] == runs[False][0]
            torch.testing.assert_close(runs[True][1], runs[False][1], atol=1e-4, rtol=1e-4)
        else:
            a, b = runs[False][1], runs[True][1]
            assert (a - b).abs().max() <= 0.05 * a.std()
