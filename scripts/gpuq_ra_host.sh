#!/bin/bash
# h25r: RetrievalAttention host tier (split decode) vs the loading path, 8B random model, 32K; host half at 128K
nproc; lscpu | grep -E "Model name|L3" | cut -c1-120
timeout 25 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_retrieval_host_gpu.py 2>&1 | tail -3
python3 -P scripts/bench_ra_host.py --budget 72 2>&1
