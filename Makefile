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

.PHONY: setup test test-fast orthanc demo demo-vision demo-pacs demo-reasoning bench tiny clean help

help:
	@echo "make demo   - offline end-to-end run on the embedded tiny model (about 2 min on 2 cores)"
	@echo "make demo-vision - the same for an image model: tiny Qwen2.5-VL on bundled figures (a few min)"
	@echo "make demo-reasoning - base -> SFT -> +GRPO on tiny-reasoning, one table (docs/REASONING.md)"
	@echo "make demo-pacs - the PACS loop on the tiny image model: Orthanc, ask, SR write-back, read back"
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
	$(PYTHON) -m pmcvqa_sft.models.tiny

test: setup $(VENV)/.installed-test orthanc
	$(PYTHON) -m pytest tests -q -ra

# Orthanc (+ its DICOMweb plugin, dcmtk) for the PACS tests and make demo-pacs (docs/PACS.md). As root it is
# installed from Debian; policy-rc.d stops the package from starting a system Orthanc on 8042/4242.
ORTHANC_PKGS = orthanc orthanc-dicomweb dcmtk
orthanc:
	@if command -v Orthanc >/dev/null 2>&1 && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  made=0; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
	    chmod +x /usr/sbin/policy-rc.d; made=1; fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(ORTHANC_PKGS); \
	  rc=$$?; if [ $$made = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; (service orthanc stop || true) >/dev/null 2>&1; exit $$rc; \
	else echo "Orthanc missing (PACS tests skip, CI fails): sudo apt-get install -y --no-install-recommends $(ORTHANC_PKGS)"; fi

# the test-only packages (serving engine extras, openai client, lm-eval): requirements-test.txt
$(VENV)/.installed-test: requirements-test.txt requirements.txt $(VENV)/.installed
	$(PYTHON) -m pip install -q -r requirements-test.txt
	touch $@

# The whole pipeline on the embedded tiny model and the bundled sample: real 8-bit bitsandbytes + PEFT
# on the CPU, no network. DEMO_STEPS / DEMO_LR follow docs/BENCHMARKS.md's learning measurements.
DEMO_STEPS ?= 600
DEMO_LR    ?= 1e-3
demo: setup
	@set -e; run="$(RUN_DIR)"; start=$$(date +%s); \
	echo "==> [1/4] embedded tiny model (first run only: tokenizer + 600 pretraining steps, then cached in artifacts/)"; \
	$(PYTHON) -m pmcvqa_sft.models.tiny; \
	echo "==> [2/4] preprocessing the bundled sample -> $$run/data"; \
	$(PYTHON) preprocess_pmc_vqa_for_sft.py --data data/sample --tokenizer tiny --output_dir $$run/data; \
	echo "==> [3/4] 8-bit LoRA training on the CPU -> $$run/model"; \
	$(PYTHON) train_sft_example.py --model tiny --dataset_dir $$run/data --output_dir $$run/model \
	  --quantization 8bit --max_steps $(DEMO_STEPS) --learning_rate $(DEMO_LR) \
	  --per_device_train_batch_size 16 --gradient_accumulation_steps 1 --no-gradient_checkpointing \
	  --eval_steps 100 --logging_steps 20; \
	echo "==> [4/4] evaluating base vs tuned on the held-out sample questions -> $$run/eval"; \
	$(PYTHON) inference_example.py --adapter $$run/model --quantization 8bit --evaluate --compare_base \
	  --dataset_dir $$run/data --split test --output_dir $$run/eval; \
	echo "demo finished in $$(( $$(date +%s) - start )) s; run card, loss curve, predictions and metrics in:"; \
	echo "$$run"

# The image path end to end on the embedded tiny Qwen2.5-VL and the bundled figure sample (questions only
# answerable by looking): 8-bit LoRA on the language model + the trained merger, then base vs tuned vs
# blind (every figure blanked). One torch thread: two stall on a busy 2-core machine (docs/VISION.md).
VDEMO_STEPS   ?= 600
VDEMO_LR      ?= 2e-3
VDEMO_THREADS ?= 1
VRUN_DIR      ?= runs/demo-vision-$(shell date +%Y%m%d-%H%M%S)
demo-vision: setup
	@set -e; run="$(VRUN_DIR)"; start=$$(date +%s); export OMP_NUM_THREADS=$(VDEMO_THREADS); \
	echo "==> [1/4] embedded tiny Qwen2.5-VL (built once, cached in artifacts/)"; \
	$(PYTHON) -m pmcvqa_sft.models.tiny --vision; \
	echo "==> [2/4] preprocessing the bundled image sample (figures read from the zip) -> $$run/data"; \
	$(PYTHON) preprocess_pmc_vqa_for_sft.py --data data/sample_vision --images data/sample_vision/images_2.zip \
	  --tokenizer tiny-vision --output_dir $$run/data; \
	echo "==> [3/4] 8-bit LoRA training on the CPU (vision tower frozen, merger trained) -> $$run/model"; \
	$(PYTHON) train_sft_example.py --model tiny-vision --dataset_dir $$run/data --output_dir $$run/model \
	  --quantization 8bit --train_vision merger --max_steps $(VDEMO_STEPS) --learning_rate $(VDEMO_LR) \
	  --warmup_steps 20 --per_device_train_batch_size 16 --gradient_accumulation_steps 1 \
	  --no-gradient_checkpointing --eval_steps 100 --logging_steps 20; \
	echo "==> [4/4] evaluating base vs tuned vs blind on the held-out figures -> $$run/eval"; \
	$(PYTHON) inference_example.py --adapter $$run/model --quantization 8bit --evaluate --compare_base \
	  --dataset_dir $$run/data --split test --output_dir $$run/eval; \
	echo "demo-vision finished in $$(( $$(date +%s) - start )) s; run card, loss curve, predictions and metrics in:"; \
	echo "$$run"

# base -> SFT -> +GRPO on tiny-reasoning (docs/REASONING.md): the tiny model with one token per choice letter +
# answer word and binding drills in its pretraining (built once, ~2.5 min). SFT with reshuffled choices and a
# trained lm_head (the tiny model's frozen head samples no parseable answer at temperature 1), then TRL's
# GRPOTrainer on the exact-answer rewards; each stage evaluated by inference_example.py --method generate.
RDEMO_SFT_STEPS  ?= 600
RDEMO_GRPO_STEPS ?= 40
RDEMO_GRPO_LR    ?= 5e-5
RRUN_DIR         ?= runs/demo-reasoning-$(shell date +%Y%m%d-%H%M%S)
demo-reasoning: setup
	@set -e; run="$(RRUN_DIR)"; start=$$(date +%s); export OMP_NUM_THREADS=1; \
	echo "==> [1/5] embedded tiny-reasoning model (first run only: 1500 pretraining steps, then cached in artifacts/)"; \
	$(PYTHON) -m pmcvqa_sft.models.tiny --reasoning; \
	echo "==> [2/5] preprocessing the bundled sample -> $$run/data"; \
	$(PYTHON) preprocess_pmc_vqa_for_sft.py --data data/sample --tokenizer tiny-reasoning --output_dir $$run/data; \
	echo "==> [3/5] LoRA SFT, choices reshuffled per draw, lm_head trained -> $$run/sft"; \
	$(PYTHON) train_sft_example.py --model tiny-reasoning --dataset_dir $$run/data --output_dir $$run/sft \
	  --quantization none --shuffle_choices --train_head --max_steps $(RDEMO_SFT_STEPS) --learning_rate 1e-3 \
	  --per_device_train_batch_size 16 --gradient_accumulation_steps 1 --no-gradient_checkpointing \
	  --eval_steps 100 --logging_steps 50; \
	echo "==> [4/5] GRPO on the SFT adapter (4 prompts x 8 completions, rewards correct + 0.1 format) -> $$run/grpo"; \
	$(PYTHON) train_sft_example.py --stage grpo --init_adapter $$run/sft --dataset_dir $$run/data \
	  --output_dir $$run/grpo --quantization none --shuffle_choices --max_steps $(RDEMO_GRPO_STEPS) \
	  --learning_rate $(RDEMO_GRPO_LR) --per_device_train_batch_size 32 --gradient_accumulation_steps 1 \
	  --num_generations 8 --max_completion_length 32 --no-gradient_checkpointing --eval_steps 20 \
	  --logging_steps 10; \
	echo "==> [5/5] evaluating base, SFT and GRPO on the held-out questions (greedy generation)"; \
	$(PYTHON) inference_example.py --model tiny-reasoning --quantization none --evaluate --method generate \
	  --dataset_dir $$run/data --split test --output_dir $$run/eval-base; \
	for s in sft grpo; do $(PYTHON) inference_example.py --adapter $$run/$$s --quantization none --evaluate \
	  --method generate --dataset_dir $$run/data --split test --output_dir $$run/eval-$$s; done; \
	$(PYTHON) -m pmcvqa_sft.evaluate.stages $$run base=$$run/eval-base sft=$$run/eval-sft grpo=$$run/eval-grpo; \
	echo "demo-reasoning finished in $$(( $$(date +%s) - start )) s; runs, curves and metrics.json in:"; \
	echo "$$run"

bench: setup
	$(PYTHON) -m pip install -q -r bench/requirements-bench.txt
	$(PYTHON) bench/bench_preprocess.py
	$(PYTHON) bench/bench_train.py
	$(PYTHON) bench/bench_eval.py
	$(PYTHON) bench/bench_threads.py
	OMP_NUM_THREADS=1 $(PYTHON) bench/bench_tiny_build.py
	$(PYTHON) bench/bench_tokenizer_hash.py
	OMP_NUM_THREADS=1 $(PYTHON) bench/bench_vision.py
	OMP_NUM_THREADS=1 $(PYTHON) bench/bench_serve.py

clean:
	rm -rf artifacts runs

# The PACS loop (docs/PACS.md) on the tiny image model: a short 8-bit LoRA run (its accuracy is not the
# point; PACS_ADAPTER=DIR reuses one), a throwaway Orthanc holding the bundled figures as DICOM, questions
# over DICOMweb, answers written back as SRs, the SRs read back and printed, Orthanc stopped.
PDEMO_STEPS ?= 40
PRUN_DIR    ?= runs/demo-pacs-$(shell date +%Y%m%d-%H%M%S)
PACS_ADAPTER ?=
demo-pacs: setup orthanc
	@set -e; run="$(PRUN_DIR)"; start=$$(date +%s); export OMP_NUM_THREADS=$(VDEMO_THREADS); \
	adapter="$(PACS_ADAPTER)"; \
	if [ -z "$$adapter" ]; then \
	  echo "==> [1/2] a quick tiny-vision adapter ($(PDEMO_STEPS) steps; accuracy is not the point) -> $$run/model"; \
	  $(PYTHON) -m pmcvqa_sft.models.tiny --vision; \
	  $(PYTHON) preprocess_pmc_vqa_for_sft.py --data data/sample_vision --images data/sample_vision/images_2.zip \
	    --tokenizer tiny-vision --output_dir $$run/data; \
	  $(PYTHON) train_sft_example.py --model tiny-vision --dataset_dir $$run/data --output_dir $$run/model \
	    --quantization 8bit --train_vision merger --max_steps $(PDEMO_STEPS) --learning_rate $(VDEMO_LR) \
	    --warmup_steps 5 --per_device_train_batch_size 16 --gradient_accumulation_steps 1 \
	    --no-gradient_checkpointing --eval_steps 1000 --logging_steps 10; \
	  adapter=$$run/model; \
	else echo "==> [1/2] reusing the adapter $$adapter"; fi; \
	echo "==> [2/2] Orthanc, figures as DICOM, ask over DICOMweb, SRs written back and read back -> $$run"; \
	$(PYTHON) -m pmcvqa_sft.verify.pacs_demo --adapter $$adapter --out $$run; \
	echo "demo-pacs finished in $$(( $$(date +%s) - start )) s"
