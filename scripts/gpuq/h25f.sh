#!/bin/bash
# GPU queue job (issue 18, fused decode step): the fused-vs-unfused step bench, the split-KV sweep, kernel checks.
set -x
date
timeout 72 python3 -P scripts/bench_decode_step.py --tokenizer "$TOK" --lengths 32000 131072 --budget 38 --steps 128 --out /tmp/bench_decode_step.json
cat /tmp/bench_decode_step.json
timeout 14 python3 -P tests/engines/fused_kernels_check.py
timeout 22 python3 -P scripts/bench_split_kv.py --lengths 32768 131072 --budget 18
date
