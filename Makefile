# PRANCE: set-up, tests, the demo and the headline run.
#   make demo        set up, then the whole pipeline on Fashion-MNIST with the short schedule (prance run --schedule demo)
#   make reproduce   set up, then the whole pipeline with the headline schedule (prance run --schedule full)
#   make headline    after reproduce: merge at budgets 0.35 and 0.7, prune and prune_merge at 0.5, one table
#   make levers      after reproduce: speed levers (round-up, MLP per stage, keep grid), the cls state encoder and
#                    fine-tuning with the selector fixed, one table
#   make test        set up, then run the test suite
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prance-setup-done

# Both run every stage of `prance run` into one folder; running them again skips the finished stages
# and continues an interrupted one (delete the folder, or add RUN_FLAGS="--restart-from STAGE", to redo).
DEMO_DIR ?= runs/demo
REPRODUCE_DIR ?= runs/reproduce
HEADLINE_DIR ?= runs/headline
# The headline operating points besides reproduce's merge at 0.5 (mode-budget); each reuses what it shares with it.
HEADLINE_RUNS := merge-0.35 merge-0.7 prune-0.5 prune_merge-0.5
LEVERS_DIR ?= runs/levers
# Variants of reproduce (name:setting), each benchmarked at batch 1, 8 and 64.
# round-up-* reuse every training stage (reproduce rounds up to K = 4, the default): only rounding, evaluation and
# bench run.
LEVERS := round-up-off:round_up.k=0 round-up-8:round_up.k=8 encoder-cls:selector.encoder=cls \
	mlp-per-stage:selector.mlp_per_stage=true keep-grid-0.1:selector.keep_grid=0.1 fixed-selector:finetune.alternate=0
RUN_FLAGS ?=
# pytest-xdist workers for `make test` (each runs one torch thread); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

.PHONY: help setup data test demo reproduce headline levers

help:
	@echo "make demo        the whole pipeline on Fashion-MNIST, short schedule (26 min on 2 idle cores of a 2 GHz Zen 1), into $(DEMO_DIR)"
	@echo "make reproduce   the whole pipeline with the headline schedule, into $(REPRODUCE_DIR)"
	@echo "make headline    after reproduce: merge at 0.35 and 0.7, prune and prune_merge at 0.5, compared in $(HEADLINE_DIR)"
	@echo "make levers      after reproduce: round-up off/K=8, cls encoder, MLP per stage, keep grid, fixed-selector fine-tuning"
	@echo "make test        run the tests"
	@echo "make setup       create $(VENV) (Python 3.11) with the exact versions of requirements.lock"
	@echo "make data        make sure Fashion-MNIST is installed (Debian package dataset-fashion-mnist)"

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
	$(PY) -m pytest -q -n $(TEST_WORKERS)

demo: setup data
	@echo "== demo: prance run --schedule demo into $(DEMO_DIR); progress: one line per stage, report in $(DEMO_DIR)/report.md"
	@echo "== interrupt any time: 'make demo' continues where it stopped"
	$(PY) -m prance run --schedule demo --out $(DEMO_DIR) $(RUN_FLAGS)

reproduce: setup data
	@echo "== reproduce: prance run --schedule full into $(REPRODUCE_DIR) (hours on 2 CPU cores); 'make reproduce' continues"
	$(PY) -m prance run --schedule full --out $(REPRODUCE_DIR) $(RUN_FLAGS)

# Reuses reproduce's dense model (and, for merge, its meta-network): only what a mode or budget changes runs.
headline: reproduce
	@for run in $(HEADLINE_RUNS); do \
		echo "== headline: $$run into $(HEADLINE_DIR)/$$run"; \
		$(PY) -m prance run --schedule full --mode $${run%-*} --budget $${run##*-} --reuse $(REPRODUCE_DIR) \
			--out $(HEADLINE_DIR)/$$run $(RUN_FLAGS) || exit 1; \
	done
	@# One selector for every budget (trained once on reproduce's meta-network), evaluated and benched at 3 budgets.
	@sel=$(HEADLINE_DIR)/budget-range; resume=$$(test -f $$sel/last.pt && echo --resume); \
	test -f $$sel/adaptive.pt || $(PY) -m prance train-selector --meta $(REPRODUCE_DIR)/meta/best.pt \
		--budget-range 0.3,0.8 --budget-bins 11 --updates 900 --out $$sel $$resume || exit 1; \
	for b in 0.35 0.5 0.7; do \
		test -f $$sel/test-$$b.json || $(PY) -m prance evaluate --checkpoint $$sel/adaptive.pt --budget $$b \
			--out $$sel/test-$$b.json || exit 1; \
		test -f $$sel/bench-$$b/bench.json || $(PY) -m prance bench --checkpoint $$sel/adaptive.pt --budget $$b \
			--methods dense-timm,prance --batch-sizes 1,64 --runs 20 --warmup 5 --rounds 4 --pool 64 --threads 1 \
			--out $$sel/bench-$$b || exit 1; \
	done
	$(PY) -m prance compare $(REPRODUCE_DIR) $(addprefix $(HEADLINE_DIR)/,$(HEADLINE_RUNS)) \
		$(foreach b,0.35 0.5 0.7,--evaluation $(HEADLINE_DIR)/budget-range/test-$(b).json \
		--bench $(HEADLINE_DIR)/budget-range/bench-$(b)/bench.json) --out $(HEADLINE_DIR)

# Each variant changes one setting of reproduce and reuses the stages before the one it changes.
levers: reproduce
	@for lever in $(LEVERS); do \
		echo "== levers: $${lever#*:} into $(LEVERS_DIR)/$${lever%%:*}"; \
		$(PY) -m prance run --schedule full --set "$${lever#*:}" --set "bench.batch_sizes=[1,8,64]" \
			--reuse $(REPRODUCE_DIR) --out $(LEVERS_DIR)/$${lever%%:*} $(RUN_FLAGS) || exit 1; \
	done
	$(PY) -m prance compare $(REPRODUCE_DIR) $(foreach l,$(LEVERS),$(LEVERS_DIR)/$(firstword $(subst :, ,$(l)))) \
		--out $(LEVERS_DIR)
