#!/usr/bin/env bash
# GPU-queue job (/work/wt/GPUQ.md) for the KIVI kernel: the kernel microbenchmark (v1 vs v2 tunings, 32 layers,
# 32K and 128K), then the CUDA tests of the KIVI fast path. Runs from a copy of the worktree on the GPU box.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
timeout 70 python3 -P scripts/bench_kivi_kernel.py "$@"
timeout 25 python3 -P -m pytest -q -p no:cacheprovider tests/methods/test_kivi_fast.py -k "not interpreter" 2>&1 | tail -15
