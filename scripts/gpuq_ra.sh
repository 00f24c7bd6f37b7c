#!/bin/bash
# h28r GPU-queue job (< 80 s): RetrievalAttention's device tier with the sampled-threshold select
# (scbench/kernels/sample_select.py) against the radix select at 131K / 32K (CUDA graphs of the 32-layer attention,
# scripts/bench_ra_device.py), then its CUDA tests.
export PYTHONUNBUFFERED=1
timeout 50 python3 -P scripts/bench_ra_device.py --lengths 131072 32768 --variants sample sample_fuse \
  --extra sample_c16k sample_fuse+merge --stages --budget 46 2>&1 | grep -v Warning
timeout 20 python3 -P -m pytest -q -x -p no:cacheprovider tests/unit/test_sample_select.py 2>&1 | tail -3
