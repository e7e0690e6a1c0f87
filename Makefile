# PRANCE: set-up, tests and a demo.
#   make demo   set up, then train the dense fmnist-tiny ViT on Fashion-MNIST and evaluate it
#   make test   set up, then run the test suite
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prance-setup-done

# The demo: DEMO_EPOCHS full passes over the 60k training images. Measured on 2 idle cores: ~200 img/s,
# 5 minutes per epoch including validation, so 4 epochs take ~21 minutes (much longer on a busy machine).
DEMO_DIR ?= runs/demo
DEMO_EPOCHS ?= 4
DEMO_BATCH ?= 128
DEMO_WARMUP ?= 0.3

.PHONY: help setup data test demo

help:
	@echo "make demo   train the dense fmnist-tiny ViT on Fashion-MNIST ($(DEMO_EPOCHS) epochs) into $(DEMO_DIR), then evaluate it"
	@echo "make test   run the tests"
	@echo "make setup  create $(VENV) (Python 3.11) with the exact versions of requirements.lock"
	@echo "make data   make sure Fashion-MNIST is installed (Debian package dataset-fashion-mnist)"

setup: $(STAMP)

# Re-runs only when the lock file or the package metadata change.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.lock
	$(PY) -m pip install --no-deps -e .
	@touch $@

data:
	@scripts/ensure-fashion-mnist.sh

test: setup data
	$(PY) -m pytest -q

# Re-running continues the run in $(DEMO_DIR) (--resume) instead of starting over; a finished run
# is only evaluated again. Delete $(DEMO_DIR) to train from scratch.
demo: setup data
	@echo "== demo: training the dense fmnist-tiny ViT (1.4 M params) on Fashion-MNIST for $(DEMO_EPOCHS) epochs (~5 min each on 2 idle cores) into $(DEMO_DIR)"
	@echo "== progress: $(DEMO_DIR)/log.jsonl; interrupt any time, 'make demo' continues from the last finished epoch"
	$(PY) -m prance train-dense --preset fmnist-tiny --data fashion-mnist --epochs $(DEMO_EPOCHS) \
		--batch-size $(DEMO_BATCH) --warmup-epochs $(DEMO_WARMUP) --out $(DEMO_DIR) $(if $(wildcard $(DEMO_DIR)/last.pt),--resume,)
	@echo "== demo: evaluating $(DEMO_DIR)/best.pt on the 10k Fashion-MNIST test images"
	$(PY) -m prance evaluate --checkpoint $(DEMO_DIR)/best.pt --plan max --out $(DEMO_DIR)/eval.json
