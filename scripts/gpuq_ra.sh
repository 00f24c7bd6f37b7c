#!/bin/bash
# h28r GPU-queue job (< 80 s): RetrievalAttention's device tier with the sampled-threshold select
# (scbench/kernels/sample_select.py) against the radix select at 131K / 32K (CUDA graphs of the 32-layer attention,
# scripts/bench_ra_device.py), its CUDA tests, and the host tier end to end at 32K (random 8B, split decode with
# the C host kernel: tok/s and host seconds per token, scripts/bench_ra_host.py).
export PYTHONUNBUFFERED=1
timeout 30 python3 -P scripts/bench_ra_device.py --lengths 131072 32768 --variants sample sample_fuse \
  --extra sample_fuse+merge sample+merge sample_c16k sample_fw8 sample_b16 --stages --budget 27 2>&1 | grep -v Warning
timeout 11 python3 -P -m pytest -q -x -p no:cacheprovider tests/unit/test_sample_select.py 2>&1 | tail -3
timeout 33 python3 -P scripts/bench_ra_host.py --runs new --new 16 --ctx 32768 --budget 31 2>&1 | grep -v Warn
