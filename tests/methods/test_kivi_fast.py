"""KIVI's captured-step decode (methods/kivi_fast.py, scbench/kernels/kivi_decode.py) against the plain loop:
attention over the packed cache against de-quantise + float64 softmax, and greedy tokens and the cache left behind
equal to the plain path's on a tiny random Llama (float32, CPU), across group flushes and two turns. The Triton
kernels run on CUDA, and on CPU through Triton's interpreter (tests/methods/kivi_interpret_check.py, skipped
without Triton)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scbench.engines import attention, fastdecode
from scbench.kernels import kivi_decode
from scbench.kv.quant import KIVILayer, dequantize, quantize
from scbench.methods.kivi import KIVI

from support import make_tiny_engine


def _bufs(seed, b=1, h=2, cq=128, nq=96, r=80, rs=5, re=60, d=32, bits=2, group=32, vgroup=32, device="cpu",
          dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(b, h, cq, d, generator=g).to(device, dtype) for _ in range(2))
    kp, ks, kz = quantize(k, bits, group, axis=-2)
    vp, vs, vz = quantize(v, bits, vgroup, axis=-1)
    rk, rv = (torch.randn(b, h, r, d, generator=g).to(device, dtype) for _ in range(2))
    t = lambda x: torch.tensor([x], device=device)  # noqa: E731
    keys = torch.cat([dequantize(kp, ks, kz, bits, group, -2, dtype)[:, :, :nq], rk[:, :, rs:re]], dim=-2)
    vals = torch.cat([dequantize(vp, vs, vz, bits, vgroup, -1, dtype)[:, :, :nq], rv[:, :, rs:re]], dim=-2)
    return (kp, ks, kz, vp, vs, vz, rk, rv, t(nq), t(rs), t(re)), keys, vals


@pytest.mark.parametrize("bits,hq", [(2, 4), (4, 8)])
def test_kivi_attention_torch_matches_reference(bits, hq):
    bufs, keys, vals = _bufs(bits, bits=bits)
    q = torch.randn(1, hq, 1, 32, generator=torch.Generator().manual_seed(9))
    got = kivi_decode.kivi_attention_torch(q, *bufs, bits=bits, group=32, vgroup=32, scale=0.2)
    want = attention.reference_causal_attention(q, keys, vals, scale=0.2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_values_to_words_layout(bits):
    """Token-major value words: word c of a chunk holds channel c of its 32 / bits tokens, token k in bits k * bits;
    values_from_words inverts it."""
    from scbench.kv.quant import pack, unpack

    t, d = 32 // bits, 32
    q = torch.randint(0, 2**bits, (1, 2, 3 * t, d), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    vp = pack(q, bits)
    w = kivi_decode.values_to_words(vp, bits)
    assert w.shape == vp.shape and w.dtype == torch.uint8
    words = w.view(torch.int32).reshape(1, 2, 3, d).to(torch.int64) & 0xFFFFFFFF
    for chunk, c, k in [(0, 0, 0), (1, 5, t - 1), (2, d - 1, 3), (0, 17, t // 2)]:
        assert (words[0, 1, chunk, c] >> (k * bits)) & (2**bits - 1) == q[0, 1, chunk * t + k, c]
    assert torch.equal(kivi_decode.values_from_words(w, bits), vp)
    assert torch.equal(unpack(kivi_decode.values_from_words(w, bits), bits), q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("mode", [1, 2, 3])
def test_unpack_asm_constants_give_exact_integers(dtype, bits, mode):
    """The inline PTX's arithmetic, emulated: every field value OR-ed into MAGIC's mantissa at the offsets the PTX
    uses, times its multiplier plus its addend (one rounding, as the packed fma), is the integer itself."""
    import re

    asm = kivi_decode.unpack_asm(dtype, bits, mode)
    regs = {k: int(v, 16) & 0xFFFF for k, v in re.findall(r"mov\.b32 (\w), (0x[0-9a-f]+);", asm)}
    magic = kivi_decode.MAGIC[dtype][0]
    as_float = lambda h: torch.tensor([h - 65536 if h >= 32768 else h], dtype=torch.int16).view(dtype).double()  # noqa: E731
    masks = [int(m, 16) for m in re.findall(r"lop3\.b32 \w, \w, (0x[0-9a-f]+), u", asm)] or [((1 << bits) - 1) * 0x10001]
    pairs = list(zip(masks, ("o", "q"), ("m", "n")))
    assert len(pairs) == (2 if mode == 3 and 2 * bits <= (7 if dtype == torch.bfloat16 else 10) else 1)
    for mask, mul, add in pairs:
        assert mask >> 16 == mask & 0xFFFF  # the same field in both halves
        pos = ((mask & 0xFFFF) & -(mask & 0xFFFF)).bit_length() - 1
        for x in range(1 << bits):
            v = as_float(magic | (x << pos)) * as_float(regs[mul]) + as_float(regs[add])
            assert v.to(dtype).item() == x, (x, pos, v)


@pytest.mark.skipif(not torch.cuda.is_available() or kivi_decode.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,cq,nq,r,rs,re", [(2, 8192, 8000, 320, 33, 96), (4, 4096, 1024, 64, 0, 40),
                                               (2, 512, 0, 64, 0, 9), (2, 8192, 8000, 448, 21, 430)])
@pytest.mark.parametrize("tune", ["default", "asm0 pf0", "asm2 pf1"])
def test_kivi_attention_triton_matches_torch(dtype, bits, cq, nq, r, rs, re, tune):
    bufs, keys, vals = _bufs(cq, h=8, cq=cq, nq=nq, r=r, rs=rs, re=re, d=128, bits=bits, device="cuda", dtype=dtype)
    bufs = (*bufs[:3], kivi_decode.values_to_words(bufs[3], bits), *bufs[4:])  # the kernel's value layout
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=dtype)
    knobs = {"asm0 pf0": {"asm": 0, "prefetch": 0}, "asm2 pf1": {"asm": 2, "prefetch": 1, "maxnreg": 0}}.get(tune, {})
    got = kivi_decode.kivi_attention_triton(q, *bufs, bits=bits, group=32, vgroup=32, scale=0.09, **knobs)
    want = attention.reference_causal_attention(q.double(), keys.double(), vals.double(), scale=0.09)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its CPU interpreter)")
def test_kivi_kernels_in_triton_interpreter():
    """The Triton attention (GQA 4/2/1/8, 2 and 4 bits, float32 and float16, prefetch modes), the decode step
    (attention, flush, counters; fused; one kernel) and the fast-decode plugin on the Triton kernels (greedy tokens,
    two turns) on CPU tensors, in Triton's interpreter, against the torch reference / the plain loop."""
    script = Path(__file__).with_name("kivi_interpret_check.py")
    tests = str(Path(__file__).resolve().parent.parent)  # tests/: the script imports support
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    att = res["attention"]
    n = len(res["cases"])
    assert max(att[:n]) < 1e-5 and max(att[n:]) < 3e-3, att  # float32, float16 (int16 and int32 words)
    for i, (fp32, out, same_counters, flushed, *bufs) in enumerate(res["step"]):
        assert out < (1e-5 if fp32 else 5e-3) and same_counters == 1.0 and flushed == 1.0, res["step"][i]
        assert max(bufs) < 1e-3, bufs  # packed bytes: a rare rounding tie may differ; scales/zeros exact
    for key in ("plugin", "plugin_temp"):  # the plugin on the Triton kernels, flush modes 0 and 2; decode_cache=temp
        (ppath, plain, n0), *fast = res[key]
        assert ppath == "plain" and n0 == 0
        for path, tokens, calls in fast:
            assert path == "static" and tokens == plain
        assert 0 < fast[0][2] < fast[1][2]  # every fast run went through the Triton attention


def _decode(engine, method, mode, prompt, follow, n=(45, 38)):
    engine.decode_mode = mode
    try:
        s = engine.session(method)
        s.feed(prompt, compress=True, sparse=False)
        a = s.generate(n[0])
        s.drop_last(len(a.tokens) - 1)
        s.feed(follow, compress=False, sparse=False)
        b = s.generate(n[1])
        return [a.tokens, b.tokens], [a.decode_path, b.decode_path], s
    finally:
        engine.decode_mode = "auto"


@pytest.mark.parametrize("bits,group,residual", [(2, 16, 16), (4, 8, 5), (2, 32, 0)])
def test_fast_kivi_equals_plain(smol_tokenizer, bits, group, residual):
    engine = make_tiny_engine(smol_tokenizer, layers=2)
    g = torch.Generator().manual_seed(bits * group + residual)
    prompt = torch.randint(5, 2000, (201,), generator=g).tolist()
    follow = torch.randint(5, 2000, (13,), generator=g).tolist()
    cfg = dict(bits=bits, group=group, residual=residual)
    plain, ppath, ps = _decode(engine, KIVI(**cfg), "plain", prompt, follow)
    fast, fpath, fs = _decode(engine, KIVI(**cfg), "fast", prompt, follow)
    assert ppath == ["plain"] * 2 and fpath == ["static"] * 2
    assert fast == plain
    assert fs.memory()["kv_bytes"] == ps.memory()["kv_bytes"]
    for a, b in zip(fs.cache.layers, ps.cache.layers):
        assert isinstance(a, KIVILayer) and a.n_quant == b.n_quant
        for x, y in zip(a.dequantized(), b.dequantized()):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_plugin_declines_other_layers(tiny_engine):
    s = tiny_engine.session(KIVI())
    s.feed([5, 6, 7] * 30, compress=False, sparse=False)
    assert "not a KIVILayer" in fastdecode.unsupported(s.cache, s.method)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cfg", [{"name": "kivi", "bits": 2, "group": 16, "residual": 16},
                                 {"name": "kivi", "bits": 2, "group": 16, "residual": 16, "decode_cache": "temp"},
                                 {"name": "quest", "budget": 64, "page_size": 16, "dense_layers": 1}])
def test_cuda_graph_plugins_equal_plain(cfg):
    """Captured graph (warm-up step undone, plugin state restored) against the plain loop, float32 on CUDA."""
    from scbench.engines.hf import HFEngine
    from scbench.registry import METHODS
    from support import byte_tokenizer, random_llama

    tok = byte_tokenizer()
    model = random_llama(len(tok), layers=3, eos_token_id=tok.eos_token_id)
    engine = HFEngine("tiny", model=model, tokenizer=tok, device="cuda", dtype="float32")
    prompt = torch.randint(5, 250, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    follow = prompt[:23]
    method = METHODS.get(cfg["name"])
    knobs = {k: v for k, v in cfg.items() if k != "name"}
    plain, _, _ = _decode(engine, method(**knobs), "plain", prompt, follow, n=(60, 41))
    fast, paths, _ = _decode(engine, method(**knobs), "fast", prompt, follow, n=(60, 41))
    assert paths == ["graph", "graph"]
    assert fast == plain


@pytest.mark.skipif(not torch.cuda.is_available() or kivi_decode.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,full", [(2, True), (4, True), (2, False)])
def test_flush_kernel_matches_torch(dtype, bits, full):
    torch.manual_seed(bits)
    b, h, c, d, cq, g, res = 1, 8, 512, 128, 1024, 32, 32
    k, v = (torch.randn(b, h, c, d, device="cuda", dtype=dtype) * 3 for _ in range(2))
    bufs = [torch.randint(0, 255, (b, h, cq, d * bits // 8), dtype=torch.uint8, device="cuda"),
            torch.randn(b, h, cq // g, d, device="cuda", dtype=dtype), torch.randn(b, h, cq // g, d, device="cuda", dtype=dtype),
            torch.randint(0, 255, (b, h, cq, d * bits // 8), dtype=torch.uint8, device="cuda"),
            torch.randn(b, h, cq, d // g, device="cuda", dtype=dtype), torch.randn(b, h, cq, d // g, device="cuda", dtype=dtype)]
    t = lambda x: torch.tensor([x], device="cuda")  # noqa: E731
    rs, re = 37, 37 + res + g - (0 if full else 1)
    outs = []
    for fn in (kivi_decode.kivi_flush_torch, kivi_decode.kivi_flush_triton):
        mine = [x.clone() for x in bufs]
        triton_layout = fn is kivi_decode.kivi_flush_triton  # packed values token-major
        if triton_layout:
            mine[3] = kivi_decode.values_to_words(mine[3], bits)
        nq_t, rs_t = t(320), t(rs)
        fn(k, v, *mine, nq_t, rs_t, t(re), bits=bits, group=g, vgroup=g, residual=res)
        if triton_layout:
            mine[3] = kivi_decode.values_from_words(mine[3], bits)
        outs.append((mine, int(nq_t), int(rs_t)))
    (a, nq_a, rs_a), (b_, nq_b, rs_b) = outs
    assert (nq_a, rs_a) == (nq_b, rs_b) == ((352, rs + g) if full else (320, rs))
    for x, y in zip(a, b_):
        if x.dtype == torch.uint8:  # rounding ties may differ in a rare element
            assert (x != y).float().mean() < 1e-3
        else:  # torch divides by the level count as a multiply by its reciprocal: 1 ulp in float32
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    if not full:
        assert all(torch.equal(x, y) for x, y in zip(a, bufs))


@pytest.mark.skipif(not torch.cuda.is_available() or kivi_decode.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,full", [(2, True), (4, True), (2, False)])
@pytest.mark.parametrize("fuse", [0, 1, 2])
def test_decode_step_triton_matches_torch(dtype, bits, full, fuse):
    """The step's kernels (attention, flush, counters; fused: attention + flush, merge + counters; one kernel) against
    the torch ops, 8B head shapes."""
    torch.manual_seed(bits)
    h, c, d, cq, g, res = 8, 512, 128, 4096, 32, 32
    k, v = (torch.randn(1, h, c, d, device="cuda", dtype=dtype) * 3 for _ in range(2))
    kk, vv = (torch.randn(1, h, cq, d, device="cuda", dtype=dtype) for _ in range(2))
    bufs = [*quantize(kk, bits, g, axis=-2), *quantize(vv, bits, g, axis=-1)]
    q = torch.randn(1, 32, 1, d, device="cuda", dtype=dtype)
    at = 37 + res + g - (1 if full else 2)
    outs = []
    for use in (False, True):
        mine = [x.clone() for x in bufs]
        if use:  # the kernels hold the packed values token-major
            mine[3] = kivi_decode.values_to_words(mine[3], bits)
        nq, rs = torch.tensor([2048], device="cuda"), torch.tensor([37], device="cuda")
        o = kivi_decode.kivi_decode_step(q, *mine, k, v, nq, rs, torch.tensor([at], device="cuda"), bits=bits, group=g,
                                         vgroup=g, scale=0.09, residual=res, triton_ok=use, fuse=fuse)
        if use:
            mine[3] = kivi_decode.values_from_words(mine[3], bits)
        outs.append((o, mine, (int(nq), int(rs))))
    (oa, a, ca), (ob, b, cb) = outs
    assert ca == cb == ((2048 + g, 37 + g) if full else (2048, 37))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ob.double(), oa.double(), atol=tol, rtol=tol)
    for x, y in zip(a, b):
        if x.dtype == torch.uint8:
            assert (x != y).float().mean() < 1e-3
        else:
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
