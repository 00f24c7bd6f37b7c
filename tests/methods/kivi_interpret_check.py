"""Run by tests/methods/test_kivi_fast.py in a subprocess with TRITON_INTERPRET=1: the KIVI Triton kernels executed
by Triton's CPU interpreter on tiny shapes against the torch reference. Prints one JSON line of largest errors."""
import json
import sys

import torch

try:  # Triton 3.x's interpreter turns a loop bound loaded from memory (a 1-element array) into an int with
    # int(array), which NumPy 2 refuses for 1-d arrays: take the element.
    from triton.runtime import interpreter as _ti

    _orig = _ti._patch_lang_tensor

    def _patched(tensor, scope):
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _ti._patch_lang_tensor = _patched
except (ImportError, AttributeError):  # pragma: no cover - other Triton versions
    pass

from scbench.engines import attention  # noqa: E402
from scbench.kernels import kivi_decode as kd  # noqa: E402
from scbench.kv.quant import dequantize, quantize  # noqa: E402


CASES = [(2, 8, 2, 256, 160, 40, 3, 30, 32), (4, 4, 2, 128, 64, 20, 0, 17, 32), (2, 2, 2, 128, 96, 16, 0, 0, 16),
         (2, 16, 2, 128, 128, 16, 4, 9, 16),
         # residual buffers over 128 rows: several programs read the residual (res_splits), all of them busy / two
         (2, 4, 2, 128, 64, 300, 5, 290, 32), (4, 8, 2, 128, 96, 200, 0, 20, 32)]
"""(bits, query heads, KV heads, packed rows, in use, residual buffer rows, residual [rs, re), group)"""


def attention_errors() -> list[float]:
    """kivi_attention_triton against float64 attention over the de-quantised rows (GQA 4, 2, 1, 8; 2 and 4 bits;
    float32, float16; without prefetch, with it, with the words only; packed values token-major)."""
    errs = []
    for dtype, prefetch in ((torch.float32, 0), (torch.float16, 0), (torch.float16, 1), (torch.float16, 2)):
        for bits, hq, h, cq, nq, r, rs, re, g in CASES:
            gen = torch.Generator().manual_seed(bits * hq + cq)
            k, v = (torch.randn(1, h, cq, 32, generator=gen).to(dtype) for _ in range(2))
            kp, ks, kz = quantize(k, bits, g, axis=-2)
            vp, vs, vz = quantize(v, bits, g, axis=-1)
            rk, rv = (torch.randn(1, h, r, 32, generator=gen).to(dtype) for _ in range(2))
            keys = torch.cat([dequantize(kp, ks, kz, bits, g, -2, dtype)[:, :, :nq], rk[:, :, rs:re]], dim=-2)
            vals = torch.cat([dequantize(vp, vs, vz, bits, g, -1, dtype)[:, :, :nq], rv[:, :, rs:re]], dim=-2)
            q = torch.randn(1, hq, 1, 32, generator=gen).to(dtype)
            t = lambda x: torch.tensor([x])  # noqa: E731
            got = kd.kivi_attention_triton(q, kp, ks, kz, kd.values_to_words(vp, bits), vs, vz, rk, rv, t(nq),
                                           t(rs), t(re - 1), bits=bits, group=g, vgroup=g, scale=0.2, re_add=1, ctas=4,
                                           prefetch=prefetch)
            want = attention.reference_causal_attention(q.double(), keys.double(), vals.double(), scale=0.2)
            errs.append((got.double() - want).abs().max().item())
    return errs


def step_errors() -> list[list[float]]:
    """kivi_decode_step, Triton (attention, then flush + counter kernels; fused: attention + flush, merge +
    counters; or one kernel) against the torch ops: output, every buffer and the counters, with and without a group flush. A row:
    [float32?, output error, counters equal, flushed as expected, buffer differences...]."""
    rows = []
    for dtype in (torch.float32, torch.float16):
        for bits, full, fuse, c in [(2, True, 0, 128), (4, True, 0, 128), (2, False, 0, 128), (2, True, 1, 128),
                                    (4, True, 1, 128), (2, False, 1, 128), (2, True, 2, 128), (2, False, 2, 128),
                                    (2, True, 1, 160), (2, True, 2, 160)]:  # 160 rows: 3 residual programs
            gen = torch.Generator().manual_seed(bits)
            h, d, cq, g, res = 2, 32, 256, 16, 16
            k, v = (torch.randn(1, h, c, d, generator=gen).to(dtype) * 3 for _ in range(2))
            kk, vv = (torch.randn(1, h, cq, d, generator=gen).to(dtype) for _ in range(2))
            bufs = [*quantize(kk, bits, g, axis=-2), *quantize(vv, bits, g, axis=-1)]
            q = torch.randn(1, 8, 1, d, generator=gen).to(dtype)
            at = 37 + res + g - (1 if full else 2)
            outs = []
            for use in (False, True):
                mine = [x.clone() for x in bufs]
                if use:  # the kernels hold the packed values token-major
                    mine[3] = kd.values_to_words(mine[3], bits)
                nq, rs = torch.tensor([96]), torch.tensor([37])
                o = kd.kivi_decode_step(q, *mine, k, v, nq, rs, torch.tensor([at]), bits=bits, group=g, vgroup=g,
                                        scale=0.3, residual=res, triton_ok=use, fuse=fuse)
                if use:
                    mine[3] = kd.values_from_words(mine[3], bits)
                outs.append((o, mine, (int(nq), int(rs))))
            (oa, a, ca), (ob, b, cb) = outs
            flushed = float(ca == (112, 53)) if full else float(ca == (96, 37))
            diffs = [(x != y).float().mean().item() if x.dtype == torch.uint8 else (x.double() - y.double()).abs().max().item()
                     for x, y in zip(a, b)]
            rows.append([float(dtype == torch.float32), (oa.double() - ob.double()).abs().max().item(), float(ca == cb),
                         flushed, *diffs])
    return rows


def plugin_tokens(decode_cache: str = "quantized") -> list[list]:
    """The fast-decode plugin with the Triton kernels forced on CPU tensors (the interpreter; float32, tiny random
    Llama, head_dim 16): its greedy tokens over two turns, each flush mode, with the plain loop's first. Covers the
    plugin's token-major value layout at load and back at store_back. ``decode_cache="temp"``: the attention-only
    step (no flush)."""
    from support import byte_tokenizer, make_tiny_engine

    from scbench.methods import kivi_fast
    from scbench.methods.kivi import KIVI

    kivi_fast.KIVIDecode.triton_ok = lambda self, q: True
    kd.TUNE["ctas"] = 4  # few programs: the interpreter runs them one by one
    calls = [0]
    kernel = getattr(kd.kivi_attention_triton, "counted", kd.kivi_attention_triton)

    def counted(*args, **kwargs):
        calls[0] += 1
        return kernel(*args, **kwargs)

    counted.counted = kernel
    kd.kivi_attention_triton = counted
    engine = make_tiny_engine(byte_tokenizer(), layers=2)
    prompt = torch.randint(5, 250, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    runs = []
    for mode, fuse in (("plain", 0), ("fast", 0), ("fast", 2)):
        kd.FUSE_FLUSH = fuse
        engine.decode_mode = mode
        sess = engine.session(KIVI(bits=2, group=16, residual=16, decode_cache=decode_cache))
        sess.feed(prompt, compress=True, sparse=False)
        a = sess.generate(20)
        sess.drop_last(len(a.tokens) - 1)
        sess.feed(prompt[:9], compress=False, sparse=False)
        b = sess.generate(16)
        runs.append([a.decode_path, a.tokens + b.tokens, calls[0]])
    return runs


if __name__ == "__main__":
    json.dump({"cases": CASES, "attention": attention_errors(), "step": step_errors(), "plugin": plugin_tokens(),
               "plugin_temp": plugin_tokens("temp")}, sys.stdout)
