#!/bin/bash
# h27r GPU-queue job (< 60 s): CUDA tests of the one-launch select and the host split, RetrievalAttention device
# tier per 32-layer step (before vs variants, stages) at 128K and 32K, then an end-to-end 32K host-tier split decode
# and the host tier's C kernel per layer (32K, 128K).
export PYTHONUNBUFFERED=1
nproc; grep -o -m1 -E "avx512_bf16|amx_bf16" /proc/cpuinfo | sort -u | tr '\n' ' '; grep -m1 "model name" /proc/cpuinfo; gcc --version | head -1
timeout 14 python3 -m pytest -q -x -p no:cacheprovider tests/unit/test_row_select.py tests/gpu/test_retrieval_host_gpu.py 2>&1 | tail -4
timeout 18 python3 -P scripts/bench_ra_device.py --lengths 131072 32768 --stages --budget 14 2>&1 | grep -v "^JSON"
timeout 25 python3 -P scripts/bench_ra_host.py --runs new --new 16 --native-micro 32768 131072 --micro --budget 24 2>&1
