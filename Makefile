# PMC-VQA SFT toolkit. Quick start:  make demo   (whole pipeline offline on the embedded tiny model)
#                                    make test   (the test suite)
# `make setup` makes .venv and installs requirements.txt; every other target runs it first.

PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
# CPU machines: torch 2.13.0. GPU users: install the CUDA build of torch into .venv first
# (docs/INSTALLATION.md), or pass e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cu128".
TORCH   ?= torch==2.13.0
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
export TOKENIZERS_PARALLELISM ?= true
export HF_HUB_DISABLE_TELEMETRY = 1

.PHONY: setup test test-fast demo bench tiny clean help

help:
	@echo "make demo   - offline end-to-end run on the embedded tiny model (about 5 min on 2 cores)"
	@echo "make test   - run the test suite"
	@echo "make bench  - run the benchmarks (bench/results/*.json, docs/BENCHMARKS.md)"
	@echo "make setup  - create $(VENV) and install requirements.txt"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $@

tiny: setup
	$(PYTHON) -m pmcvqa_sft.tiny

test: setup
	$(PYTHON) -m pytest tests -q -ra

demo: setup
	@$(PYTHON) -m pmcvqa_sft.demo --run_dir $(RUN_DIR)

bench: setup
	$(PYTHON) -m pip install -q -r bench/requirements-bench.txt
	$(PYTHON) bench/bench_preprocess.py
	$(PYTHON) bench/bench_train.py
	$(PYTHON) bench/bench_eval.py

clean:
	rm -rf artifacts runs
