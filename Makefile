# GlobalCom² benchmark harness. `make help` lists the targets.
#
# Every target that runs Python depends on `install`, so `make demo` and `make test`
# work on a fresh clone. The virtual environment lives in .venv and is rebuilt when
# pyproject.toml changes.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp

# On a machine without an NVIDIA driver we install this torch first and pin it, so that
# lmms-eval's dependencies cannot swap it for a CUDA build. Override to taste, e.g.
#   make install TORCH_SPEC=torch==2.5.1 PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

# Everything runs offline: no model or dataset is ever fetched from a hub by the tests or the demo.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: help install test test-all test-gpu lint format bench-attach bench-globalcom2 bench-in-llm data clean \
	demo table1-7b table1-13b ablations ablations-hparams efficiency sweep tables visualize cls-share train-tiny wandb-sync bench-efficiency \
	gpu-checklist

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the project (editable) with its dev tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
ifeq ($(HAS_CUDA),1)
	$(PY) -m pip install -e '.[dev]'
else
	@echo ">> no NVIDIA driver found: installing CPU $(TORCH_SPEC) and keeping it pinned"
	$(PY) -m pip install $(PIP_TORCH_ARGS) '$(TORCH_SPEC)'
	$(PY) -m pip freeze | grep -E '^torch==' > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -c $(VENV)/torch-constraint.txt -e '.[dev]'
	@# lmms-eval pulls a CUDA-only torchvision from PyPI; with a CPU torch it breaks every
	@# LLaVA-NeXT import in transformers ("operator torchvision::nms does not exist"). timm imports it
	@# too and breaks the accelerate CLI. transformers falls back to its PIL image processors.
	@if ! $(PY) -c 'import torchvision' >/dev/null 2>&1; then \
		echo ">> removing the torchvision/timm that cannot load on this torch"; \
		$(PY) -m pip uninstall -y -q torchvision timm; \
	fi
endif
	$(PY) -c 'from transformers import LlavaNextForConditionalGeneration; import lmms_eval, globalcom2; print("install ok")'
	@touch $@

test: install  ## run the default test suite (CPU, tiny model, offline)
	$(PY) -m pytest -q

test-all: install  ## run every test, the slow ones included
	$(PY) -m pytest -q -m 'not gpu and not network'

test-gpu: install  ## the tests that need a CUDA device
	$(PY) -m pytest -q -m gpu

lint: install  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-attach: install  ## prefill overhead of attach() at retention_ratio=1.0 (tiny model, 672x672)
	$(PY) -m globalcom2.perf.attach_overhead

bench-globalcom2: install  ## GlobalCom² scoring + allocation + selection time per image -> results/efficiency/
	$(PY) -m globalcom2.perf.globalcom2_selection $(ARGS)

bench-in-llm: install  ## prefill time/memory of FastV and SparseVLM at R=0.25, scoring memory (tiny model, 672x672)
	$(PY) -m globalcom2.perf.in_llm_cost

# The ten benchmarks' hub data, saved for offline runs into $GLOBALCOM2_DATA_DIR (default: data/).
# Needs network access and HF_TOKEN; says what is missing and exits non-zero otherwise.
# Subset: make data BENCHMARKS=pope,mme (names: python -c "from globalcom2.data.benchmarks import BENCHMARKS; print(*BENCHMARKS)")
data: install  ## download the benchmarks for offline evaluation (network + HF_TOKEN; BENCHMARKS=pope,mme)
	HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 TRANSFORMERS_OFFLINE=0 \
		$(PY) -m globalcom2.data.download $(if $(BENCHMARKS),--benchmarks $(BENCHMARKS),)

# Paper targets: one line each on top of an experiment config. DRY_RUN=1 lists the cells without running;
# ARGS="..." appends Hydra overrides (e.g. ARGS="launcher=accelerate launcher.num_processes=4").
RUN := $(PY) -m globalcom2.run -m
RUN_ARGS = $(if $(DRY_RUN),dry_run=true,) $(ARGS)

RESULTS ?= $(or $(GLOBALCOM2_RESULTS),results)

demo: install  ## every method x 4 ratios on the trained tiny model (tiny-trained) and the synthetic demo benchmark, then tables and plots
	$(RUN) experiment=demo $(RUN_ARGS)
	$(if $(DRY_RUN),,$(PY) -m globalcom2.report $(RESULTS) --experiment demo)

table1-7b: install  ## GlobalCom² Table 1 on LLaVA-NeXT-7B (checkpoint + `make data`)
	$(RUN) experiment=paper_table1_7b $(RUN_ARGS)

table1-13b: install  ## GlobalCom² Table 1 on LLaVA-NeXT-13B (checkpoint + `make data`)
	$(RUN) experiment=paper_table1_13b $(RUN_ARGS)

ablations: install  ## GlobalCom² allocation x score ablations at R=0.25 (7B)
	$(RUN) experiment=ablations $(RUN_ARGS)

ablations-hparams: install  ## GlobalCom² alpha x temperature sensitivity at R=0.25 (7B)
	$(RUN) experiment=ablations_hparams $(RUN_ARGS)

efficiency: install  ## efficiency benchmark (Tables 8/9 protocol); ARGS="model=llava_next_7b model.random_init=true" on a GPU
	$(RUN) experiment=efficiency $(RUN_ARGS)

sweep: install  ## method x ratio grid on any model/benchmark, e.g. ARGS="model=tiny benchmark=pope"
	$(RUN) sweep=methods_x_ratios $(RUN_ARGS)

# On a lent GPU machine (no make install there: PYTHONPATH=. and carried wheels), in order of value, with a
# time budget; every step's files land in $(OUT) (default gpu_checklist_out/) as soon as it ends.
gpu-checklist:  ## the GPU measurements in one command: 7B/13B efficiency tables, GPU tests, selection time
	PYTHONPATH=. $(PYTHON) -m globalcom2.perf.gpu_checklist $(if $(OUT),--out $(OUT),) $(ARGS)

bench-efficiency: install  ## stage-resolved efficiency of every method, interleaved per image (tiny, CPU; ARGS="--random-init 7b --device cuda --compile" on a GPU)
	$(PY) -m globalcom2.perf.efficiency $(ARGS)

tables: install  ## tidy results, tables and plots of every experiment under results/ (WANDB=1 also logs them)
	$(PY) -m globalcom2.report $(RESULTS) $(if $(WANDB),--wandb,)

# Without IMAGE, draws demo test item DEMO_INDEX (a colour question on a 1008x336 canvas) with the trained
# tiny model; PRETRAINED=tiny shows the random-weight model, whose selections show the mechanics only.
IMAGE ?=
DEMO_INDEX ?= 9
R ?= 0.25
PRETRAINED ?= tiny-trained
visualize: install  ## kept tokens of GlobalCom² vs random vs FastV: make visualize [IMAGE=path] [R=0.25] [PRETRAINED=tiny-trained]
	$(PY) -m globalcom2.report.visualize --ratio $(R) --pretrained "$(PRETRAINED)" \
		$(if $(IMAGE),--image "$(IMAGE)" --out $(RESULTS)/visualize/kept_tokens_r$(R),--demo-index $(DEMO_INDEX) --out $(RESULTS)/visualize/demo_test_$(DEMO_INDEX))

# Trains the demo's tiny LLaVA-NeXT (about 45 min on 2 CPU cores) into globalcom2/models/checkpoints/tiny-trained,
# which is committed: `make demo` does not need this. ARGS="out=/tmp/ckpt align.steps=100" to change the config.
train-tiny: install  ## train the tiny LLaVA-NeXT on the demo's train split (configs/train/tiny_trained.yaml)
	$(PY) -m globalcom2.training.train_tiny --config configs/train/tiny_trained.yaml $(ARGS)

# Does the thumbnail's [CLS] attention, which GlobalCom² reads, look at the demo's shapes? Share on shape
# patches vs the uniform share, per model. ARGS="--items 30 --pretrained tiny path/to/checkpoint" to change.
cls-share: install  ## [CLS] attention share on demo shapes vs uniform (tiny, tiny-trained) -> results/cls_share/
	$(PY) -m globalcom2.report.cls_share --out $(RESULTS)/cls_share/cls_share.json $(ARGS)

wandb-sync: install  ## upload the offline wandb runs under results/ (needs a login and network)
	@runs=$$(find $(RESULTS) -type d -name 'offline-run-*'); \
	if [ -z "$$runs" ]; then echo "no offline wandb runs under $(RESULTS)"; exit 0; fi; \
	$(VENV)/bin/wandb sync $$runs

clean:  ## remove caches (keeps .venv and results/)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
