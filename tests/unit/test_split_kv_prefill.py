"""Split-KV lower-right attention of a few query rows over many keys (scbench/kernels/dense.py): a later turn's
prompt over its context on CUDA. The split and its log-sum-exp merge against the float64 masked reference on the CPU
(the plain part ``attention_lse``); on CUDA ``causal_attention`` (which takes the split with flash parts) against the
reference and against the one-call form."""
import pytest
import torch

from scbench.kernels import dense


def qkv(tq, tk, hq, hk, d=16, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, hq, tq, d, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(1, hk, tk, d, generator=g, device=device, dtype=dtype) for _ in range(2))
    return q, k, v


def reference(q, k, v, scale):
    """float64 softmax with the lower-right causal mask, GQA by repetition."""
    hq, hk, tq, tk = q.shape[1], k.shape[1], q.shape[-2], k.shape[-2]
    kk, vv = (x.repeat_interleave(hq // hk, 1).double() for x in (k, v))
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq), float("-inf"))
    return s.softmax(-1) @ vv


@pytest.mark.parametrize("tq,tk,segment", [(1, 100, 16), (7, 100, 16), (16, 16, 16), (20, 37, 16), (33, 500, 64),
                                           (5, 64, 64), (40, 300, 7)])
@pytest.mark.parametrize("hq,hk", [(6, 2), (2, 2)])
def test_split_matches_masked_reference(tq, tk, segment, hq, hk):
    q, k, v = qkv(tq, tk, hq, hk, seed=tq + tk)
    out = dense.split_kv_lower_right(q, k, v, 0.25, part=dense.attention_lse, segment=segment)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.25), atol=1e-5, rtol=1e-5)


def test_the_segments_as_strided_views_through_a_fused_kernel():
    """The whole segments go to the part as one batched call on views of the cache (batch stride one segment, head
    stride the buffer's), GQA unrepeated: here CPU's fused flash kernel takes them, as CUDA's flash does (CPU flash's
    causal flag is top-left, so the causal tail takes the plain part). The cache is a slice of a longer buffer, as a
    decode buffer with room is."""
    q, buf, vbuf = qkv(9, 700, 8, 2, d=32, seed=3)
    k, v = buf[:, :, :650], vbuf[:, :, :650]  # not contiguous: head stride 700 rows
    seen = []

    def part(q, k, v, causal, scale):
        if causal:
            return dense.attention_lse(q, k, v, True, scale)
        seen.append((k.shape, k.is_contiguous()))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]

    out = dense.split_kv_lower_right(q, k, v, 0.2, part=part, segment=128)
    assert seen == [(torch.Size([5, 2, 128, 32]), False)]  # (650 - 9) // 128 whole segments, one call, no copy
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.2), atol=1e-5, rtol=1e-5)


def test_a_part_that_declines_declines_the_split():
    q, k, v = qkv(4, 200, 4, 2)
    calls = []

    def part(q, k, v, causal, scale):
        calls.append(causal)
        return None

    assert dense.split_kv_lower_right(q, k, v, 0.25, part=part, segment=16) is None
    assert calls == [False]  # the whole segments' call declined first: nothing else ran


def test_reference_part_keeps_the_log_sum_exp():
    q, k, v = qkv(5, 30, 4, 2)
    out, lse = dense.attention_lse(q, k, v, True, 0.3)
    torch.testing.assert_close(out.double(), reference(q, k, v, 0.3), atol=1e-5, rtol=1e-5)
    s = (q.double() @ k.repeat_interleave(2, 1).double().transpose(-1, -2)) * 0.3
    s = s.masked_fill(~torch.ones(5, 30, dtype=torch.bool).tril(25), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash parts)")
@pytest.mark.parametrize("tq", [2, 50, 256])
def test_cuda_causal_attention_takes_the_split(tq, monkeypatch):
    """Llama-3.1-8B heads, bf16: causal_attention of a short chunk over 20K keys (split-KV flash) against the float64
    reference and the one-call form (SCBENCH_SPLIT_KV_ROWS=0, the default)."""
    q, k, v = qkv(tq, 20000 + tq, 32, 8, d=128, seed=tq, dtype=torch.bfloat16, device="cuda")
    scale = 128 ** -0.5
    assert dense.split_kv_lower_right(q, k, v, scale) is not None  # flash takes the parts on this build
    monkeypatch.setattr(dense, "SPLIT_KV_ROWS", 256)
    out = dense.causal_attention(q, k, v, scale)
    torch.testing.assert_close(out.double(), reference(q, k, v, scale), atol=2e-2, rtol=2e-2)
    monkeypatch.setattr(dense, "SPLIT_KV_ROWS", 0)
    torch.testing.assert_close(out.float(), dense.causal_attention(q, k, v, scale).float(), atol=2e-2, rtol=2e-2)
