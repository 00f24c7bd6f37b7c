#!/usr/bin/env bash
# The GPU side of the test suite on a lent GPU box (no package index there): installs scbench and the wheels it lacks
# into /tmp/site, then runs every test that uses CUDA (tests/gpu, the fast-decode kernels, sharding, batched decode,
# sparse prefill) on the GPU. CI has no GPU: there these tests skip. Kernel tests run first, the model replays last;
# one line per test goes to stdout as it finishes (a run cut short by a time limit keeps what it printed), and to
# $OUT/gpu_tests.log when $OUT is set.
#   run(carry=[".gpuwhl"]):  bash scripts/gpu_tests.sh [pytest args]     (GPU_TESTS="tests/x.py ...": only those)
# .gpuwhl (git-ignored): `bash scripts/gpu_wheels.sh` builds it here first.
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
site=${SCBENCH_TEST_SITE:-/tmp/scbench-tests-site}  # its own folder: helper copies on the same box put theirs first in /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --no-cache-dir --upgrade --target $site .gpuwhl/*.whl .gpuwhl/*.tar.gz
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target $site . 2>&1 \
  | grep -v -i -E "deprecat|license|\*\*\*|!!|^ *$" || true
export PYTHONPATH=$site SCBENCH_CACHE=/tmp/scbcache
# the embedded model's tokenizer and config (the GGUF is not carried), laid out as its converted folder (resolve() takes
# a folder with config.json and model.safetensors as converted): tests that load its weights are marked slow and left out
tok=/tmp/scbcache/models/smollm2-135m-instruct-f32
[ -f .gpuwhl/smol_tok/config.json ] || { echo "gpu_tests.sh: .gpuwhl/smol_tok/config.json missing: rerun scripts/gpu_wheels.sh" >&2; exit 2; }
mkdir -p $tok && cp .gpuwhl/smol_tok/* $tok/ && touch $tok/model.safetensors
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')"
kernels="tests/unit/test_topk_select.py tests/unit/test_quest_select.py tests/unit/test_row_select.py
  tests/unit/test_sample_select.py tests/unit/test_prev_select.py tests/engines/test_shared_prefix_kernel.py tests/engines/test_ragged_shared_kernel.py
  tests/methods/test_h2o_kernel.py tests/methods/test_quest_fast.py tests/methods/test_kivi_fast.py
  tests/methods/test_kivi_load.py tests/methods/test_kivi_dequant.py tests/methods/test_retrieval_fast.py
  tests/engines/test_fused_decode.py tests/unit/test_block_lists.py tests/methods/test_vs_lines.py tests/unit/test_split_kv_prefill.py
  tests/unit/test_prefix_rows.py tests/unit/test_mlp_rows.py tests/methods/test_h2o_in_forward.py"
models="tests/gpu tests/methods/test_cacheblend.py tests/engines/test_fast_decode.py tests/engines/test_warmup_lengths.py tests/methods/test_kvzip_scale.py
  tests/engines/test_sharding.py tests/methods/test_ragged_methods.py tests/methods/test_ragged_fast.py
  tests/engines/test_quest_batch.py tests/engines/test_retrieval_batch.py tests/engines/test_batched_decode.py
  tests/engines/test_kivi_batch.py"
log=${OUT:-/tmp}/gpu_tests.log
# -P: import the installed package, not the source folders (methods/ is installed as scbench.methods)
# GPU_TESTS="file ..." runs only those (a short call); the default is every CUDA test above
python3 -P -m pytest -v -p no:cacheprovider -m "not slow" -rfE --durations=15 ${GPU_TESTS:-$kernels $models} "$@" 2>&1 \
  | tee "$log" | grep -E --line-buffered "PASSED|FAILED|ERROR|passed|failed|^E |slowest|s (call|setup)" | cut -c1-200
