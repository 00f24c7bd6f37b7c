"""The C host kernel of RetrievalAttention's split (scbench/kernels/ra_host.c) against the torch ops path
(methods/retrieval_host.host_partial, native=False): the same selected rows and the same partial results."""
import pytest
import torch

from scbench.kernels import ra_host
from scbench.methods.retrieval_host import host_partial

pytestmark = pytest.mark.skipif(not ra_host.available(), reason=f"ra_host C kernel unavailable: {ra_host.error()}")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("hq", [6, 8])  # 8 / 2 KV heads: the four-head scans (AVX-512F, AVX512-BF16 where built)
@pytest.mark.parametrize("n,lo,hi,top_k,d", [(700, 5, 650, 64, 32), (300, 0, 290, 500, 16), (5000, 128, 4488, 777, 24),
                                             (900, 3, 880, 50, 64)])
def test_native_equals_the_torch_path(dtype, group, hq, n, lo, hi, top_k, d):
    k, v = rand(2, 2, n, d, seed=1).to(dtype), rand(2, 2, n, d, seed=2).to(dtype)
    q = rand(2, hq, d, seed=3).to(dtype).float()  # a query the keys' dtype holds exactly (the model's own)
    want = host_partial(q, k.float(), v, lo, hi, top_k, group, 0.2, native=False)
    got = host_partial(q, k, v, lo, hi, top_k, group, 0.2, native=True)
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # bf16: the torch path rounds its P @ V output to bf16
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], want[0], atol=tol, rtol=tol)


def test_native_float_query_over_bf16_keys():
    """A query bfloat16 does not hold exactly: float32 products of the converted keys (no BF16 dot products)."""
    k, v = rand(1, 2, 800, 32, seed=4).bfloat16(), rand(1, 2, 800, 32, seed=5).bfloat16()
    q = rand(1, 8, 32, seed=6)
    want = host_partial(q, k.float(), v, 10, 700, 60, False, 0.2, native=False)
    got = host_partial(q, k, v, 10, 700, 60, False, 0.2, native=True)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], want[0], atol=4e-3, rtol=4e-3)


def test_native_ties_take_the_lowest_rows():
    """Every score equal: the first top_k rows of the searched range are attended (mean of their values)."""
    n, d = 600, 16
    k = torch.zeros(1, 1, n, d)
    v = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 1, n, d).contiguous()
    out, lse = host_partial(torch.ones(1, 2, d), k, v, 10, 500, 100, False, 1.0, native=True)
    torch.testing.assert_close(out, torch.full((1, 2, d), 10 + 99 / 2))
    torch.testing.assert_close(lse, torch.full((1, 2), float(torch.tensor(100.0).log())))


def test_native_rejects_what_it_cannot_read():
    k = rand(1, 2, 50, 8)
    with pytest.raises(ValueError, match="unsupported"):
        ra_host.host_partial(rand(1, 4, 8), k[..., :40, :], k, 0, 30, 5, False, 1.0)


@pytest.mark.parametrize("group", [False, True])
def test_native_sampled_select_equals_the_radix_select(group):
    """Rows long enough for the sampled select (>= 16,384 and >= 8 top_k), many exactly tied scores (bf16 keys of a
    few values): the same rows as the plain radix select (ties: the lowest rows), so the same output bit for bit."""
    n, d = 20000, 32
    k = (rand(1, 2, n, d, seed=7) * 2).round().clamp(-2, 2).bfloat16()
    v = rand(1, 2, n, d, seed=8).bfloat16()
    q = rand(1, 8, d, seed=12).round().bfloat16().float()
    try:
        ra_host.tune(sampled=False)
        want = host_partial(q, k, v, 50, n - 100, 1000, group, 0.2, native=True)
        ra_host.tune(sampled=True)
        before = ra_host.counts()
        got = host_partial(q, k, v, 50, n - 100, 1000, group, 0.2, native=True)
        after = ra_host.counts()
    finally:
        ra_host.tune()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert after["sampled_rows"] - before["sampled_rows"] == (2 if group else 8)  # every row took it


def test_native_sampled_select_random_scores():
    n, d = 40000, 64
    k, v = rand(1, 1, n, d, seed=9).bfloat16(), rand(1, 1, n, d, seed=10).bfloat16()
    q = rand(1, 4, d, seed=11).bfloat16().float()
    want = host_partial(q, k.float(), v, 128, n - 512, 4096, False, 0.125, native=False)
    before = ra_host.counts()
    got = host_partial(q, k, v, 128, n - 512, 4096, False, 0.125, native=True)
    after = ra_host.counts()
    assert after["sampled_rows"] - before["sampled_rows"] == 4 and after["fallbacks"] == before["fallbacks"]
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], want[0], atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("group", [False, True])
def test_host_job_equals_host_partial(group):
    """The stream path's job (``ra_host.HostJob``, run by a CUDA host function in methods/retrieval_host.stream_decode)
    gives host_partial's numbers bit for bit: bfloat16 query converted in C, one thread fewer, output packed into
    the partial-result buffer [B, Hq, D + 1] (out, then lse)."""
    b, hq, hkv, n, d, lo, hi, k = 2, 8, 2, 3000, 64, 7, 2900, 100
    keys, vals = rand(b, hkv, n, d, seed=7).bfloat16(), rand(b, hkv, n, d, seed=8).bfloat16()
    qb = rand(b, hq, d, seed=9).bfloat16()
    want_out, want_lse = host_partial(qb.float(), keys, vals, lo, hi, k, group, 0.125, native=True)
    qf, out, lse = torch.empty(b, hq, d), torch.empty(b, hq, d), torch.empty(b, hq)
    part, scores = torch.full((b, hq, d + 1), float("nan")), torch.empty(b * hq * (hi - lo))
    job = ra_host.HostJob(q=qb.data_ptr(), qf=qf.data_ptr(), keys=keys.data_ptr(), kcap=n, vals=vals.data_ptr(),
                          vcap=n, kbf16=1, vbf16=1, B=b, Hq=hq, Hkv=hkv, D=d, lo=lo, hi=hi, top_k=k, group=int(group),
                          nthreads=max(1, torch.get_num_threads() - 1), scale=0.125, out=out.data_ptr(),
                          lse=lse.data_ptr(), scores=scores.data_ptr(), part=part.data_ptr())
    ra_host.run_job(job)
    assert job.rc == 0 and job.done == 1 and job.seconds > 0
    assert torch.equal(part[..., :d], want_out) and torch.equal(part[..., d], want_lse)
    seconds = job.seconds
    ra_host.run_job(job)  # seconds add up over runs
    assert job.seconds > seconds and torch.equal(part[..., d], want_lse)


def test_copy_job_writes_the_rows_into_the_capacity_buffer():
    buf = rand(2, 3, 50, 16, seed=10).bfloat16()
    before = buf.clone()
    new = rand(2, 3, 2, 16, seed=11).bfloat16()
    es = buf.element_size()
    job = ra_host.CopyJob(src=new.data_ptr(), dst=buf.data_ptr() + 20 * 16 * es, heads=6, rows=2, rowbytes=16 * es,
                          dst_stride=50 * 16 * es)
    ra_host.run_job(job)
    want = before.clone()
    want[:, :, 20:22] = new
    assert job.done == 1 and torch.equal(buf, want)


def test_a_failed_host_job_raises():
    """A job whose C call failed (here D > 512) raises when its layer is next used or its seconds are taken."""
    from scbench.methods.retrieval_host import Staging

    st = Staging(torch.zeros(1, 2, 1, 4, dtype=torch.bfloat16), pin=False)
    assert st.take_seconds() == 0.0
    qb, qf, part = torch.zeros(1, 2, 600, dtype=torch.bfloat16), torch.zeros(1200), torch.zeros(1, 2, 601)
    st.job = ra_host.HostJob(q=qb.data_ptr(), qf=qf.data_ptr(), B=1, Hq=2, Hkv=1, D=600, lo=0, hi=1, top_k=1,
                             part=part.data_ptr())
    ra_host.run_job(st.job)
    assert st.job.rc == -1 and st.job.done == 1
    with pytest.raises(RuntimeError, match="returned -1"):
        st.take_seconds()
