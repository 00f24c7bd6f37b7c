#!/usr/bin/env bash
# GPU-queue job (/work/wt/GPUQ.md) for the KIVI kernel: the CUDA tests of the KIVI fast path, then the kernel
# microbenchmark (v1 vs the default tuning, 32 layers, 32K and 128K; drop --default-only for the full sweep).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
timeout 60 python3 -P -m pytest -q -p no:cacheprovider tests/methods/test_kivi_fast.py -k "not interpreter" 2>&1 | tail -25
timeout 35 python3 -P scripts/bench_kivi_kernel.py --default-only "$@"
