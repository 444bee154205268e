# GlobalCom² benchmark harness. `make help` lists the targets.
#
# Every target that runs Python depends on `install` (except `wheelhouse` and `gpu-checklist`,
# which run where this environment is not wanted), so `make demo` and `make test` work on a fresh clone. The virtual environment lives in .venv and is rebuilt when
# pyproject.toml changes.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp

# Unless the interpreter already has a CUDA torch (kept), we install this torch first and pin it, so that
# lmms-eval's dependencies cannot swap it for another build or version. Override to taste, e.g.
#   make install TORCH_SPEC=torch==2.5.1 PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=

# Everything runs offline: no model or dataset is ever fetched from a hub by the tests or the demo.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM := false

.PHONY: help install test test-slow test-exactness test-torch test-all test-gpu lint format bench-attach bench-globalcom2 bench-divprune bench-host-syncs bench-in-llm data clean \
	demo table1-7b table1-13b ablations ablations-hparams efficiency sweep tables visualize cls-share train-tiny evaluate-tiny wandb-sync bench-efficiency \
	gpu-checklist bench-throughput bench-batch-effect bench-compile-cost bench-prefetch-threads wheelhouse carry-wheels

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-16s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the project (editable) with its dev tools (WHEELHOUSE=dir: offline)

# make install WHEELHOUSE=<folder> installs from a wheelhouse (make wheelhouse) with no index; the machine's
# pip configuration is ignored, so nothing comes from anywhere else. An interpreter that already has a CUDA
# torch (a cluster module, a container) keeps it: the venv sees its site-packages and pins that torch.
WHEELHOUSE ?=
PIP_SOURCE := $(if $(WHEELHOUSE),--no-index --find-links $(abspath $(WHEELHOUSE)),)
PIP := $(if $(WHEELHOUSE),env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null ,)$(PY) -m pip
TORCH_PIN = $$(test -s $(VENV)/torch-constraint.txt && echo -c $(VENV)/torch-constraint.txt)

$(STAMP): pyproject.toml
	@cuda_torch=$$($(PYTHON) -c 'import torch; print(torch.__version__ if torch.version.cuda else "")' 2>/dev/null || true); \
	if [ -n "$$cuda_torch" ]; then \
		echo ">> keeping $(PYTHON)'s CUDA torch $$cuda_torch"; \
		$(PYTHON) -m venv --system-site-packages $(VENV) && echo "torch==$$cuda_torch" > $(VENV)/torch-constraint.txt; \
	else \
		$(PYTHON) -m venv $(VENV) && rm -f $(VENV)/torch-constraint.txt; \
	fi
	@# Without a torch to keep, install TORCH_SPEC's first and pin it, on any machine, so that lmms-eval's
	@# dependencies can neither swap it nor pull the newest torch. Where pip's sources offer no CPU build
	@# (plain PyPI on Linux), a machine without a GPU gets the CUDA build, which runs on a CPU but weighs
	@# gigabytes: PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu" selects the CPU one.
	@if [ ! -s $(VENV)/torch-constraint.txt ]; then \
		echo ">> installing $(TORCH_SPEC)$(if $(PIP_TORCH_ARGS), ($(PIP_TORCH_ARGS)),) and keeping it pinned"; \
		$(PIP) install $(PIP_SOURCE) $(PIP_TORCH_ARGS) '$(TORCH_SPEC)' && \
		$(PY) -m pip freeze | grep -E '^torch==' > $(VENV)/torch-constraint.txt; \
	fi
	$(PIP) install $(PIP_SOURCE) -c $(VENV)/torch-constraint.txt -e '.[dev]'
	@# lmms-eval pulls a CUDA-only torchvision from PyPI; with a CPU torch it breaks every
	@# LLaVA-NeXT import in transformers ("operator torchvision::nms does not exist"). timm imports it
	@# too and breaks the accelerate CLI. transformers falls back to its PIL image processors.
	@if ! $(PY) -c 'import torchvision' >/dev/null 2>&1; then \
		echo ">> removing the torchvision/timm that cannot load on this torch"; \
		$(PY) -m pip uninstall -y -q torchvision timm; \
	fi
	@echo ">> torch $$($(PY) -c 'import torch; print(torch.__version__, "CUDA " + str(torch.version.cuda) if torch.version.cuda else "CPU build")')"
	$(PY) -c 'from transformers import LlavaNextForConditionalGeneration; import lmms_eval, globalcom2; print("install ok")'
	@touch $@

# Every wheel of an offline install, for this machine or for another target (a cluster's compute nodes):
#   make wheelhouse PYTHON_VERSION=3.12 PLATFORM=manylinux_2_28_x86_64   (then: make install WHEELHOUSE=wheelhouse)
WHEELHOUSE_DIR ?= wheelhouse
# Only from the command line: Python's Docker images export PYTHON_VERSION (e.g. 3.12.7) for their own use.
TARGET_ARGS = $(if $(filter command line,$(origin PLATFORM)),--platform $(PLATFORM),) \
	$(if $(filter command line,$(origin PYTHON_VERSION)),--python-version $(PYTHON_VERSION),)
wheelhouse:  ## download every wheel the project needs into wheelhouse/ (PYTHON_VERSION=3.12 PLATFORM=manylinux_2_28_x86_64)
	$(PYTHON) globalcom2/wheelhouse.py --out $(WHEELHOUSE_DIR) --torch-spec '$(TORCH_SPEC)' $(TARGET_ARGS)

test: install  ## run the default test suite (CPU, tiny model, offline)
	$(PY) -m pytest -q

# The exactness tests (R = 1 bit-identical, batch = single, FastV/SparseVLM parity) on a second transformers:
# `make test` runs on the newest that `make install` resolves, this on the oldest supported one. It is
# installed without dependencies into its own folder inside the venv and shadows the venv's copy through
# PYTHONPATH, so the venv itself never changes.
EXACTNESS_TRANSFORMERS ?= 5.23.0
ALT_TRANSFORMERS := $(VENV)/alt-transformers-$(EXACTNESS_TRANSFORMERS)

test-exactness: install  ## the exactness tests on a second transformers (EXACTNESS_TRANSFORMERS=5.23.0)
	@test -f $(ALT_TRANSFORMERS)/.complete || { rm -rf $(ALT_TRANSFORMERS) && \
		$(PIP) install -q $(PIP_SOURCE) --no-deps --target $(ALT_TRANSFORMERS) 'transformers==$(EXACTNESS_TRANSFORMERS)' && \
		touch $(ALT_TRANSFORMERS)/.complete; }
	@# An absolute path: the tests' subprocesses (two processes = one, the lmms-eval CLI) start in other folders.
	PYTHONPATH=$(abspath $(ALT_TRANSFORMERS)) $(PY) -c 'import sys, transformers as t; print("transformers", t.__version__, "from", t.__file__); sys.exit(t.__version__ != "$(EXACTNESS_TRANSFORMERS)")'
	PYTHONPATH=$(abspath $(ALT_TRANSFORMERS)) $(PY) -m pytest -q -m exactness

# The default and slow tests on another torch, on this CPU: by default 2.11.0, the lent GPU machines' torch,
# which the tests otherwise meet only there. Its PyPI wheel is the CUDA build (it runs on a CPU; about 4.6 GB
# with its nvidia and triton wheels). Like test-exactness, it goes into its own folder inside the venv and
# shadows the venv's torch through PYTHONPATH; torch's pure-Python dependencies are pinned to the venv's own
# versions, so torch and its CUDA libraries are all that change.
ALT_TORCH ?= 2.11.0
ALT_TORCH_DIR := $(VENV)/alt-torch-$(ALT_TORCH)
ALT_TORCH_TESTS ?= not gpu and not network

test-torch: install  ## the default and slow tests on another torch, on the CPU (ALT_TORCH=2.11.0: the GPU image's)
	@test -f $(ALT_TORCH_DIR)/.complete || { rm -rf $(ALT_TORCH_DIR) && \
		$(PY) -m pip freeze --exclude-editable --exclude torch > $(VENV)/alt-torch-constraints.txt && \
		$(PIP) install -q $(PIP_SOURCE) -c $(VENV)/alt-torch-constraints.txt --target $(ALT_TORCH_DIR) \
			'torch==$(ALT_TORCH)' && \
		touch $(ALT_TORCH_DIR)/.complete; }
	PYTHONPATH=$(abspath $(ALT_TORCH_DIR)) $(PY) -c 'import sys, torch; print("torch", torch.__version__, "from", torch.__file__); sys.exit(torch.__version__.split("+")[0] != "$(ALT_TORCH)")'
	PYTHONPATH=$(abspath $(ALT_TORCH_DIR)) $(PY) -m pytest -q -m '$(ALT_TORCH_TESTS)'

# `make test` is the quick loop (under 15 minutes on a 2-core CPU). The `slow` tests check the same paths end to
# end (whole cells in subprocesses, two processes, the CLIs, training, compilation): CI runs them after it.
test-slow: install  ## the slow tests only (CI runs them after make test)
	$(PY) -m pytest -q -m 'slow and not gpu and not network'

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

bench-divprune: install  ## DivPrune's selection of a call of 1/8/16 images, lockstep vs one at a time (ARGS="--device cuda" on a GPU)
	$(PY) -m globalcom2.perf.divprune_lockstep $(ARGS)

bench-host-syncs: install  ## host reads per prefill forward of every method (tiny model, 672x672, R=0.25) -> results/efficiency/host_syncs_<device>
	$(PY) -m globalcom2.perf.host_syncs $(ARGS)

bench-in-llm: install  ## prefill time/memory of FastV and SparseVLM at R=0.25, scoring memory (tiny model, 672x672)
	$(PY) -m globalcom2.perf.in_llm_cost

# The ten benchmarks' hub data, saved for offline runs into $GLOBALCOM2_DATA_DIR (default: data/).
# Needs network access and HF_TOKEN; says what is missing and exits non-zero otherwise.
# Subset: make data BENCHMARKS=pope,mme (names: python -c "from globalcom2.data.benchmarks import BENCHMARKS; print(*BENCHMARKS)")
data: install  ## download the benchmarks for offline evaluation (network + HF_TOKEN; BENCHMARKS=pope,mme; FORCE=1 replaces)
	HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 TRANSFORMERS_OFFLINE=0 \
		$(PY) -m globalcom2.data.download $(if $(BENCHMARKS),--benchmarks $(BENCHMARKS),) $(if $(FORCE),--force,)

# Paper targets: one line each on top of an experiment config. DRY_RUN=1 lists the cells without running;
# ARGS="..." appends Hydra overrides (e.g. ARGS="launcher=accelerate launcher.num_processes=4").
RUN := $(PY) -m globalcom2.run -m
RUN_ARGS = $(if $(DRY_RUN),dry_run=true,) $(ARGS)

RESULTS ?= $(or $(GLOBALCOM2_RESULTS),results)
# the runs write where the reports read: `make demo RESULTS=x` both runs into x and tabulates x
export GLOBALCOM2_RESULTS := $(abspath $(RESULTS))

demo: install  ## every method x 3 ratios on the trained tiny model (tiny-trained) and the synthetic demo benchmark, then tables and plots
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

efficiency: install  ## efficiency benchmark (Tables 8/9 protocol); ARGS="model=llava_next_7b model.random_init=true model.vicuna_text=true" on a GPU
	$(RUN) experiment=efficiency $(RUN_ARGS)

sweep: install  ## method x ratio grid on any model/benchmark, e.g. ARGS="model=tiny benchmark=pope"
	$(RUN) sweep=methods_x_ratios $(RUN_ARGS)

# The wheels a machine with torch already installed lacks (HAVE: its `pip list --format=freeze`), traced from one
# tiny cell through `globalcom2.run` and through the lmms-eval CLI: e.g. a GPU container or a lent benchmark machine.
# PYTHON_VERSION=<the target's> (e.g. 3.12) is required, on the command line: the wheels are chosen for that Python
# and CARRY_PLATFORMS (one built for this machine's 3.11, e.g. multiprocess's py311 wheel, makes pip refuse the
# whole install on 3.12), and the manifest records it for the check there.
CARRY_DIR ?= .whl
CARRY_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
carry-wheels: install  ## wheels a prepared machine lacks to run the harness: make carry-wheels HAVE=freeze.txt PYTHON_VERSION=3.12
	@test -n "$(HAVE)" || { echo "HAVE=<the machine's pip list --format=freeze> is required"; exit 2; }
	@test -n "$(filter command line,$(origin PYTHON_VERSION))" || \
		{ echo "PYTHON_VERSION=<its Python, e.g. 3.12> is required on the command line: wheels are chosen for it"; exit 2; }
	$(PY) -m globalcom2.carry --have $(HAVE) --out $(CARRY_DIR) --python-version $(PYTHON_VERSION) \
		$(addprefix --platform ,$(CARRY_PLATFORMS))

# On a lent GPU machine (no make install there: PYTHONPATH=. and carried wheels), in order of value, with a
# time budget; after every step $(OUT) (default gpu_checklist_out/) holds checklist.log, checklist.json and
# results.tar.gz (the tables the steps wrote). ARGS="--only STEP ..." or "--skip STEP ..." pick steps.
gpu-checklist:  ## the GPU measurements in one command: 7B/13B efficiency, GPU tests, selection time, throughput, batch effect
	PYTHONPATH=.$(if $(PYTHONPATH),:$(PYTHONPATH)) $(PYTHON) -m globalcom2.perf.gpu_checklist $(if $(OUT),--out $(OUT),) $(ARGS)

bench-throughput: install  ## samples/s and stage times of globalcom2.run cells at batch 1/4/8/16 (tiny-trained, CPU; ARGS for a GPU)
	$(PY) -m globalcom2.perf.throughput $(ARGS)

bench-batch-effect: install  ## answers and metrics that change between batch 1 and batch 8, per method (ARGS="--device cuda --dtype bfloat16")
	$(PY) -m globalcom2.perf.throughput --mode batch-effect $(ARGS)

bench-efficiency: install  ## stage-resolved efficiency of every method, interleaved per image (tiny, CPU; ARGS="--random-init 7b --device cuda --compile" on a GPU)
	$(PY) -m globalcom2.perf.efficiency $(ARGS)

bench-compile-cost: install  ## warm-up seconds of compile=true per variant at the 7B's depths, narrowed, cold and warm cache (CPU; ARGS="--size 13b")
	$(PY) -m globalcom2.perf.compile_cost $(ARGS)

bench-prefetch-threads: install  ## samples/s the batch preparation supplies with 1, 2, 4 encoding threads, nothing generating (ARGS="--device cuda")
	$(PY) -m globalcom2.lmms.prefetch_threads $(ARGS)

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
		$(if $(IMAGE),--image "$(IMAGE)",--demo-index $(DEMO_INDEX)) --out "$(RESULTS)/visualize/$(if $(IMAGE),$(basename $(notdir $(IMAGE))),demo_test_$(DEMO_INDEX))_$(notdir $(patsubst %/,%,$(PRETRAINED)))_r$(R)"

# Trains the demo's tiny LLaVA-NeXT into globalcom2/models/checkpoints/tiny-trained, which is committed:
# `make demo` does not need this. Stage 1 (the vision tower, 455 s of training on 2 CPU cores) is reused from
# globalcom2/models/checkpoints/tiny-trained-vision while its key (config, model config, generator, code, versions) is unchanged; ARGS="vision.checkpoint=none"
# trains it again. ARGS="out=/tmp/ckpt align.steps=100" to change the config. The recipe is judged on the
# demo's validation split; `make evaluate-tiny SPLIT=test` scores the test split once, after the freeze.
train-tiny: install  ## train the tiny LLaVA-NeXT on the demo's train split (configs/train/tiny_trained.yaml)
	$(PY) -m globalcom2.training.train_tiny --config configs/train/tiny_trained.yaml $(ARGS)

SPLIT ?= validation
evaluate-tiny: install  ## vanilla accuracy of tiny-trained per question type: make evaluate-tiny [SPLIT=validation|test]
	$(PY) -m globalcom2.training.evaluate --split $(SPLIT) $(ARGS)

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
