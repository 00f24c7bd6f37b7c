"""The fused decode kernels (scbench/kernels/fused.py) against their torch references, on random inputs.

Run by tests/engines/test_fused_decode.py with TRITON_INTERPRET=1 (CPU tensors through Triton's interpreter), and
as is on a GPU (CUDA tensors). The interpreter truncates float32 -> bfloat16 instead of rounding to nearest, so
bfloat16 is compared within two units in the last place; float32 to 1e-6. Prints "ok".
"""
import torch

from scbench.kernels import fused

DEV = "cuda" if torch.cuda.is_available() and not fused.INTERPRET else "cpu"


CHECKED = []


def close(a, b, dtype):
    CHECKED.append(tuple(a.shape))
    tol = 1e-6 if dtype == torch.float32 else 2 ** -6  # bf16: 2 ulp relative
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 2)


def main():
    assert fused.use_triton(torch.zeros(1, device=DEV)), "run with TRITON_INTERPRET=1 (CPU) or on a GPU"
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        rnd = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
        for n in (64, 96, 4096 if DEV == "cuda" else 160):
            x, r, w = rnd(1, 1, n), rnd(1, 1, n), rnd(n)
            close(fused.rmsnorm(x, w, 1e-5), fused.rmsnorm_ref(x, w, 1e-5), dtype)
            (o1, r1), (o2, r2) = fused.rmsnorm(x, w, 1e-6, residual=r), fused.rmsnorm_ref(x, w, 1e-6, residual=r)
            close(r1, r2, dtype)
            close(o1, o2, dtype)
        for i in (48, 1000, 14336 if DEV == "cuda" else 2100):
            gu = rnd(1, 1, 2 * i)
            close(fused.silu_mul(gu), fused.silu_mul_ref(gu), dtype)
        for hq, hkv, d, cap, at in ((4, 2, 16, 8, 3), (6, 1, 32, 40, 39), (32, 8, 128, 512, 300)):
            qkv, cos, sin = rnd(1, 1, (hq + 2 * hkv) * d), rnd(1, 1, d), rnd(1, 1, d)
            kb, vb = rnd(1, hkv, cap, d), rnd(1, hkv, cap, d)
            kb2, vb2 = kb.clone(), vb.clone()
            a = torch.tensor([at], device=DEV)
            q1 = fused.rope_store(qkv, cos, sin, kb, vb, a, hq, hkv)
            q2 = fused.rope_store_ref(qkv, cos, sin, kb2, vb2, a, hq, hkv)
            assert q1.shape == q2.shape == (1, hq, 1, d)
            close(q1, q2, dtype)
            close(kb, kb2, dtype)
            assert torch.equal(vb, vb2)
            rest = torch.arange(cap, device=DEV) != at
            assert torch.equal(kb[:, :, rest], kb2[:, :, rest])
    print("ok")
    return len(CHECKED)


if __name__ == "__main__":
    main()
