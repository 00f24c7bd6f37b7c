"""KIVI's one-kernel de-quantisation (scbench/kernels/kivi_dequant.py) equals ``scbench.kv.quant.dequantize`` bit
for bit, written at a token offset of a preallocated tensor: 2 and 4 bits, keys (per-channel groups) and values
(per-token groups), strided chunk views; in the Triton interpreter on CPU (as `make test` sets) and on CUDA."""
from __future__ import annotations

import os

import pytest
import torch

from scbench.kernels import kivi_dequant
from scbench.kv.quant import KIVILayer, dequantize, quantize

DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(kivi_dequant.triton is None or not DEVICES,
                                reason="needs Triton with CUDA or its interpreter (TRITON_INTERPRET=1)")


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("bits,axis,dtype", [(2, -2, torch.bfloat16), (4, -2, torch.float16), (2, -1, torch.float16),
                                             (4, -1, torch.bfloat16), (2, -2, torch.float32), (4, -1, torch.float32)])
def test_kernel_equals_torch(dev, bits, axis, dtype):
    """bfloat16 in the interpreter: its float32 -> bfloat16 cast truncates (CUDA rounds to nearest even, as torch),
    so there the kernel's float32 values are compared (``out`` float32, scales in bfloat16), bit for bit."""
    if dev == "cpu" and dtype == torch.bfloat16:
        x_dtype, dtype = dtype, torch.float32
    else:
        x_dtype = dtype if dtype != torch.float32 else torch.bfloat16
    g = torch.Generator().manual_seed(bits * 10 - axis)
    b, h, t, d, grp = 2, 3, 96, 32, 16
    x = (torch.randn(b, h, t + 32, d, generator=g) * 3).to(x_dtype).to(dev)
    packed, scale, zero = quantize(x, bits, grp, axis)
    if axis == -2:  # a strided view, as KIVILayer.scbench_crop keeps: the first 96 of 128 tokens
        packed, scale, zero = packed[:, :, :t], scale[:, :, : t // grp], zero[:, :, : t // grp]
    else:
        packed, scale, zero = packed[:, :, :t], scale[:, :, :t], zero[:, :, :t]
    want = dequantize(packed, scale, zero, bits, grp, axis, dtype)
    out = torch.full((b, h, t + 40, d), float("nan"), dtype=dtype, device=dev)
    kivi_dequant.dequantize_into(out, 7, packed, scale, zero, bits=bits, group=grp, axis=axis)
    assert torch.equal(out[:, :, 7 : 7 + t], want)
    assert out[:, :, :7].isnan().all() and out[:, :, 7 + t :].isnan().all()  # nothing written outside


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_layer_dequantized_on_cuda_equals_cpu():
    """KIVILayer.dequantized over several chunks and a residual: the CUDA kernel path == the CPU torch path."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 2, 200, 64, generator=g).to(torch.bfloat16)
    cpu = KIVILayer(k, v, bits=2, group=32, residual=32)
    gpu = KIVILayer(k.cuda(), v.cuda(), bits=2, group=32, residual=32)
    for step in range(40):  # appended tokens: more chunks
        nk, nv = torch.randn(2, 1, 2, 1, 64, generator=g).to(torch.bfloat16)
        a, b = cpu.update(nk, nv), gpu.update(nk.cuda(), nv.cuda())
        for x, y in zip(a, b):
            assert torch.equal(x, y.cpu())
