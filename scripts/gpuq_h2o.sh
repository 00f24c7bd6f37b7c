#!/usr/bin/env bash
# H2O first-prefill kernels and Tri-shape's warm-up on the GPU box, within 100 s (the GPU queue): the bench
# (per-layer ms at 32K and 128K, JSON last), Tri-shape's no-recompile test, then the H2O kernel CUDA tests (bf16).
export PYTHONUNBUFFERED=1
echo "== bench $(date +%T)"
timeout 36 python3 -P scripts/bench_h2o_prefill.py --lengths 32768 131072 --sweep --sweep-max 131072 --repeats 3
echo "== tri-shape warm-up recompile test $(date +%T)"
timeout 44 python3 -P -m pytest -q -x -p no:cacheprovider tests/engines/test_warmup_lengths.py -k recompile 2>&1 | tail -25
echo "== h2o kernel tests $(date +%T)"
timeout 14 python3 -P -m pytest -q -x -p no:cacheprovider tests/methods/test_h2o_kernel.py -k "bfloat16 or forward_lse" 2>&1 | tail -15
echo "== done $(date +%T)"
