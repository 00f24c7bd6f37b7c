#!/bin/bash
# GPU queue job (issue 18, fused decode step): fused-vs-unfused step bench, CUDA checks, the split-KV sweep.
date
timeout 58 python3 -P scripts/bench_decode_step.py --tokenizer "$TOK" --lengths 32000 131072 --budget 28 --steps 128 --out /tmp/bench_decode_step.json
echo "== bench rc $?"; cat /tmp/bench_decode_step.json; echo
timeout 8 python3 -P tests/engines/fused_kernels_check.py; echo "== kernels check rc $?"
timeout 12 python3 -m pytest -q -x tests/engines/test_fast_decode.py -k cuda_graph -p no:cacheprovider 2>&1 | tail -5; echo "== pytest rc $?"
timeout 16 python3 -P scripts/bench_split_kv.py --lengths 131072 32768 --budget 13
date
