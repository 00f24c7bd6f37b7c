#!/usr/bin/env bash
# H2O first-prefill kernels and Tri-shape's warm-up on the GPU box, within 100 s (the GPU queue, see the README's
# GPU notes): the CUDA tests of both, then scripts/bench_h2o_prefill.py (per-layer ms at 32K and 128K, JSON last).
export PYTHONUNBUFFERED=1
echo "== h2o kernel tests"
timeout 25 python3 -P -m pytest -q -x -p no:cacheprovider tests/methods/test_h2o_kernel.py -k "not interpreter_run" 2>&1 | tail -15
echo "== bench"
timeout 55 python3 -P scripts/bench_h2o_prefill.py --lengths 32768 131072 --sweep --repeats 3
echo "== tri-shape warm-up recompile test"
timeout 15 python3 -P -m pytest -q -x -p no:cacheprovider tests/engines/test_warmup_lengths.py -k recompile 2>&1 | tail -15
echo "== done"
