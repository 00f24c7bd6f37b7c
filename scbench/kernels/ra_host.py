"""RetrievalAttention's host half as one C call (``ra_host.c``, OpenMP over heads): the exact inner-product scan
of a layer's stored keys (float32 or bfloat16, read in place: no float32 copy), the top-k by a radix select on the
float order (ties: the lowest rows) and the attention over the selected rows, for methods/retrieval_host.py.

The torch ops path (``retrieval_host.host_partial`` with ``native=False``) is the reference: the scores are the same
float32 products up to summation order, so the selected set is ``topk``'s up to near-ties, and the output matches
(tests/methods/test_ra_host_native.py). The C file is compiled on first use with the system C compiler
(``$CC`` or gcc/cc, ``-O3 -march=native`` plus the CPU's AVX flags, ``-fopenmp``, linked against the OpenMP
runtime torch already loaded) into ``$SCBENCH_CACHE`` (default ~/.cache/scbench); without a compiler, or with
``SCBENCH_RA_NATIVE=0``, ``available()`` is False and the torch path runs. ``info()`` says how it was built.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SRC = Path(__file__).with_name("ra_host.c")
_lib = None
_error: str | None = None


FLAGS = {"avx512f": "-mavx512f", "avx512bw": "-mavx512bw", "avx512vl": "-mavx512vl", "avx512_bf16": "-mavx512bf16",
         "avx2": "-mavx2", "fma": "-mfma"}
"""CPU flags (/proc/cpuinfo) -> compiler flags added to -march=native (a compiler older than the CPU model may not
enable its features with -march=native alone); dropped if the compiler rejects them."""
_info: dict = {}


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            have = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for name, flag in FLAGS.items() if name in have]


def _loaded_gomp() -> str | None:
    """The OpenMP runtime torch loaded (a libgomp under torch/, else the system's libgomp.so.1, else the first mapped):
    linked by path, so the kernel's parallel regions use torch's thread pool (another runtime's idle threads would
    spin against it; on the H200 box scikit-learn's libgomp is mapped too)."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if "/" in line else ""
                if os.path.basename(path).startswith("libgomp") and path not in found and os.path.exists(path):
                    found.append(path)
    except OSError:
        pass
    torch_dir = os.path.dirname(torch.__file__)
    ranked = sorted(found, key=lambda p: (not p.startswith(torch_dir + os.sep) and "torch.libs" not in p,
                                          os.path.basename(p) != "libgomp.so.1"))  # torch's, the system's, others
    return ranked[0] if ranked else None


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc / cc / $CC) on PATH")
    src = SRC.read_bytes()
    gomp, extra = _loaded_gomp(), _cpu_flags()
    tag = hashlib.sha1(src + f"{cc} {gomp} {extra}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("SCBENCH_CACHE", Path.home() / ".cache" / "scbench"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not os.access(cache, os.W_OK):
            raise PermissionError(cache)
    except OSError:  # a read-only home: the temp folder
        cache = Path(tempfile.gettempdir()) / "scbench"
        cache.mkdir(parents=True, exist_ok=True)
    so = cache / f"ra_host_{tag}.so"
    _info.update(cc=cc, gomp=gomp, flags=extra)
    if not so.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out, obj = Path(tmp) / so.name, Path(tmp) / "ra_host.o"
            errors = []
            for flags in (extra, []):  # the CPU's flags, then -march=native alone
                base = [cc, "-O3", "-march=native", *flags, "-fno-math-errno", "-fopenmp", "-fPIC"]
                r = subprocess.run([*base, "-c", str(SRC), "-o", str(obj)], capture_output=True, text=True)
                if r.returncode == 0:
                    link = [cc, "-shared", str(obj), "-o", str(out), *([gomp] if gomp else ["-fopenmp"]), "-lm"]
                    r = subprocess.run(link, capture_output=True, text=True)
                if r.returncode == 0:
                    _info["flags"] = flags
                    break
                errors.append(r.stderr[-1500:])
            else:
                raise RuntimeError(f"{cc} could not build {SRC.name}: {' | '.join(errors)}")
            os.replace(out, so)
    lib = ctypes.CDLL(str(so))
    f = lib.ra_host_partial
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    f.argtypes = [P, P, P, I, L, P, I, L, I, I, I, I, I, I, I, I, ctypes.c_float, P, P, P, I]
    f.restype = I
    lib.ra_host_has_dpbf16.restype = I
    lib.ra_host_tune.argtypes = [I, I, I]
    lib.ra_host_tune.restype = None
    lib.ra_host_counts.argtypes = [I]
    lib.ra_host_counts.restype = L
    _info["dpbf16"], _info["avx512"] = bool(lib.ra_host_has_dpbf16() & 2), bool(lib.ra_host_has_dpbf16() & 1)
    return lib


def tune(ahead: int = 32, sampled: bool = True, l2: bool = False) -> None:
    """The kernel's knobs (process-wide; for measurement): the bf16 scan's software prefetch distance in rows (0:
    none) and the select of long rows (``sampled``: a bound of the k-th largest from a sample of each row's scores,
    then the exact radix select over the rows at or above it, else over the whole row; the same rows either way),
    ``l2``: the scan's prefetches into L2 only."""
    if not available():
        raise RuntimeError(f"ra_host C kernel unavailable: {_error}")
    _lib.ra_host_tune(int(ahead), int(bool(sampled)), int(bool(l2)))


def counts() -> dict:
    """Rows the sampled select took since the library loaded, and how many of them fell back to the whole row."""
    if not available():
        return {"sampled_rows": 0, "fallbacks": 0}
    return {"sampled_rows": int(_lib.ra_host_counts(1)), "fallbacks": int(_lib.ra_host_counts(0))}


def info() -> dict:
    """How the kernel was built: compiler, OpenMP runtime linked, extra flags, whether it has AVX512-BF16 scans."""
    available()
    return dict(_info, error=_error)


def has_dpbf16() -> bool:
    """Whether the compiled kernel scans bfloat16 keys with AVX512-BF16 dot products (vdpbf16ps)."""
    return available() and bool(_lib.ra_host_has_dpbf16() & 2)


def available() -> bool:
    """Whether the C kernel can run here (compiled and loaded once per process)."""
    global _lib, _error
    if os.environ.get("SCBENCH_RA_NATIVE", "1") == "0":
        return False
    if _lib is None and _error is None:
        try:
            _lib = _build()
        except Exception as e:  # no compiler, no OpenMP: the torch path runs
            _error = f"{type(e).__name__}: {e}"
    return _lib is not None


def error() -> str | None:
    """Why ``available()`` is False (None when it is True or was not asked)."""
    return _error


def supports(keys: torch.Tensor, vbuf: torch.Tensor) -> bool:
    """Buffers the kernel reads in place: host, contiguous [B, Hkv, cap, D], float32 or bfloat16, D <= 512."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) and t.is_contiguous()
               and t.dim() == 4 for t in (keys, vbuf)) and keys.shape[-1] <= 512


def host_partial(q: torch.Tensor, keys: torch.Tensor, vbuf: torch.Tensor, lo: int, hi: int, top_k: int, group: bool,
                 scale: float, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The C kernel's ``retrieval_host.host_partial``: q [B, Hq, D] float32; keys [B, Hkv, capk, D], vbuf
    [B, Hkv, capv, D] (``supports``), rows [lo, hi) searched (hi > lo) -> (out [B, Hq, D], lse [B, Hq]) float32.
    ``scores``: a reused float32 buffer of at least B * Hq * (hi - lo) elements."""
    b, hq, d = q.shape
    hkv = keys.shape[1]
    if not available():
        raise RuntimeError(f"ra_host C kernel unavailable: {_error}")
    if not supports(keys, vbuf) or hi <= lo or hi > min(keys.shape[2], vbuf.shape[2]) or hq % hkv:
        raise ValueError(f"ra_host.host_partial: keys {tuple(keys.shape)} {keys.dtype}, values {tuple(vbuf.shape)} "
                         f"{vbuf.dtype}, rows [{lo}, {hi}), {hq} query heads: unsupported")
    q = q.float().contiguous()
    qb = q.bfloat16()
    qb = qb if keys.dtype == torch.bfloat16 and torch.equal(qb.float(), q) else None  # exact in bf16: dot products
    m = hi - lo
    if scores is None or scores.numel() < b * hq * m or scores.dtype != torch.float32:
        scores = torch.empty(b * hq * m, dtype=torch.float32)
    out = torch.empty(b, hq, d, dtype=torch.float32)
    lse = torch.empty(b, hq, dtype=torch.float32)
    rc = _lib.ra_host_partial(q.data_ptr(), None if qb is None else qb.data_ptr(), keys.data_ptr(), int(keys.dtype == torch.bfloat16), keys.shape[2],
                              vbuf.data_ptr(), int(vbuf.dtype == torch.bfloat16), vbuf.shape[2], b, hq, hkv, d, lo, hi,
                              top_k, int(group), float(scale), out.data_ptr(), lse.data_ptr(), scores.data_ptr(),
                              torch.get_num_threads())
    if rc:
        raise RuntimeError(f"ra_host_partial returned {rc}")
    return out, lse


# --- stream jobs: the host half (and a decode token's new rows) as CUDA host functions ---------------------------

class HostJob(ctypes.Structure):
    """``ra_host_job`` of ra_host.c: one layer's host half, run by ``ra_host_job_run`` in the stream's order."""
    _fields_ = [("q", ctypes.c_void_p), ("qf", ctypes.c_void_p), ("keys", ctypes.c_void_p), ("kcap", ctypes.c_int64),
                ("vals", ctypes.c_void_p), ("vcap", ctypes.c_int64)] + [
        (n, ctypes.c_int) for n in ("kbf16", "vbf16", "B", "Hq", "Hkv", "D", "lo", "hi", "top_k", "group", "nthreads",
                                    "rc", "done", "pad")] + [
        ("scale", ctypes.c_float), ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("scores", ctypes.c_void_p),
        ("part", ctypes.c_void_p), ("seconds", ctypes.c_double)]


class CopyJob(ctypes.Structure):
    """``ra_copy_job`` of ra_host.c: rows from a pinned staging copy into a host tier's capacity buffer."""
    _fields_ = [("src", ctypes.c_void_p), ("dst", ctypes.c_void_p), ("heads", ctypes.c_int64), ("rows", ctypes.c_int64),
                ("rowbytes", ctypes.c_int64), ("dst_stride", ctypes.c_int64), ("done", ctypes.c_int),
                ("pad", ctypes.c_int)]


_stream_api: tuple | None = None
_stream_error: str | None = None


def stream_jobs() -> bool:
    """Whether host jobs can be launched into CUDA streams here: the C kernel is built, CUDA is up, the driver's
    ``cuLaunchHostFunc`` is found, and ``SCBENCH_RA_ASYNC`` is not 0."""
    global _stream_api, _stream_error
    if os.environ.get("SCBENCH_RA_ASYNC", "1") == "0" or not torch.cuda.is_available() or not available():
        return False
    if _stream_api is None and _stream_error is None:
        try:
            cu = ctypes.CDLL("libcuda.so.1")
            launch = cu.cuLaunchHostFunc
            launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            launch.restype = ctypes.c_int
            fns = {name: ctypes.cast(getattr(_lib, name), ctypes.c_void_p).value
                   for name in ("ra_host_job_run", "ra_copy_job_run")}
            _stream_api = (launch, fns)
        except (OSError, AttributeError) as e:
            _stream_error = f"{type(e).__name__}: {e}"
    return _stream_api is not None


def launch_job(job: ctypes.Structure, stream: torch.cuda.Stream | None = None) -> None:
    """Queue ``job`` (a ``HostJob`` or ``CopyJob``, kept alive by the caller until the stream passes it) as a host
    function on ``stream`` (default: the current one): work queued after it waits for it."""
    if not stream_jobs():
        raise RuntimeError(f"host stream jobs unavailable: {_stream_error or error() or 'disabled or no CUDA'}")
    launch, fns = _stream_api
    fn = fns["ra_host_job_run" if isinstance(job, HostJob) else "ra_copy_job_run"]
    job.done = 0
    s = stream or torch.cuda.current_stream()
    rc = launch(ctypes.c_void_p(s.cuda_stream), ctypes.c_void_p(fn), ctypes.cast(ctypes.pointer(job), ctypes.c_void_p))
    if rc:
        raise RuntimeError(f"cuLaunchHostFunc returned CUDA error {rc}")


def run_job(job: ctypes.Structure) -> None:
    """Run ``job`` here and now on the calling thread (what the stream's host function does; tests and CPU)."""
    if not available():
        raise RuntimeError(f"ra_host C kernel unavailable: {_error}")
    fn = _lib.ra_host_job_run if isinstance(job, HostJob) else _lib.ra_copy_job_run
    fn.argtypes, fn.restype = [ctypes.c_void_p], None
    job.done = 0
    fn(ctypes.byref(job))
