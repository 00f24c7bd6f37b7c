#!/bin/bash
# h28r GPU-queue job (< 80 s): RetrievalAttention's device tier with the sampled-threshold select
# (scbench/kernels/sample_select.py) against the radix select at 131K / 32K (CUDA graphs of the 32-layer attention,
# scripts/bench_ra_device.py), its CUDA tests, and the host tier's C kernel per layer at 131K
# (scripts/bench_ra_host.py --native-micro; the box's transparent-huge-page mode first).
export PYTHONUNBUFFERED=1
nproc; grep -m1 "model name" /proc/cpuinfo; cat /sys/kernel/mm/transparent_hugepage/enabled 2>&1
timeout 36 python3 -P scripts/bench_ra_device.py --lengths 131072 32768 --variants step_work sample sample_fuse sample_fuse+merge \
  --extra sample_fuse_w16 sample_fuse_c16k sample+merge sample_c4k sample_c16k sample_c32k sample_b1 sample_b16 sample_s2k sample_w4 sample_fw8 sample_fw32 \
  --stages --budget 31 2>&1 | grep -v Warning
timeout 10 python3 -P -m pytest -q -x -p no:cacheprovider tests/unit/test_sample_select.py tests/methods/test_ra_host_native.py 2>&1 | tail -3
timeout 24 python3 -P scripts/bench_ra_host.py --runs --native-micro 131072 --budget 22 2>&1
