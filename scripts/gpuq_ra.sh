#!/bin/bash
# h27r GPU-queue job (< 60 s): an end-to-end 32K host-tier split decode (random 8B) and the host tier's C kernel per
# layer (128K, 32K), then the host split's CUDA test. (Device-tier runs: scripts/bench_ra_device.py.)
export PYTHONUNBUFFERED=1
nproc; grep -m1 "model name" /proc/cpuinfo
timeout 44 python3 -P scripts/bench_ra_host.py --runs new --new 24 --native-micro 131072 32768 --micro --budget 42 2>&1
timeout 12 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_retrieval_host_gpu.py 2>&1 | tail -2
