#!/usr/bin/env bash
# `make bench-methods` on a lent GPU box (no package index there): installs the wheels scbench lacks and scbench
# itself into /tmp/site, then runs scripts/bench_methods.py on the random Llama-3.1-8B with the embedded model's
# tokenizer; every argument passes through (--lengths, --modes, --out, --deadline, ...). Run from the repository root
# or from a gpu_sync copy (.gpu/NAME: .gpuwhl and results/ are then looked up two folders up).
#   run(carry=[".gpu/NAME", ".gpuwhl"]): cd .gpu/NAME && bash scripts/bench_methods_gpu.sh --lengths 32000 --out $OUT/m32k
#   On a lent box pass --commit $(git rev-parse --short HEAD) from here: the copy there may carry a stale .git.
set -euo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
whl=.gpuwhl; [ -d "$whl" ] || whl=../../.gpuwhl
measured=results/perf/methods_gpu.json; [ -f "$measured" ] || measured=../../results/perf/methods_gpu.json
if [ ! -f /tmp/site/.scbench-bench ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$whl"/*.whl "$whl"/*.tar.gz 2>&1 | grep -v -i -E "deprecat|warning" || true
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . \
    2>&1 | grep -v -i -E "deprecat|license|\*\*\*|!!|^ *$" || true
  touch /tmp/site/.scbench-bench
fi
export PYTHONPATH=/tmp/site
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
# -P: the installed package, not the source folders (methods/ is installed as scbench.methods)
exec python3 -P scripts/bench_methods.py --tokenizer "$(cd "$whl/smol_tok" && pwd)" --measured "$measured" "$@"
