# make demo  - set up .venv and run the embedded default job (generated data, CPU is fine)
# make test  - set up .venv, lint, and run the whole test suite (what CI runs)
# make lint  - ruff

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and separately so that a machine's own build can be kept:
# `make setup TORCH_SPEC=` skips it (e.g. a CUDA build already in the venv). The default is the
# pair that works on the project's CPU machines (PyPI's torchvision does not match their torch).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Test processes (pytest-xdist, whole files per process): the suite is mostly start-ups and
# waits, so two processes on CI's 2 cores cut its wall time; `make test TEST_WORKERS=0` runs it
# in one process.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint bench clean constraints

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(strip $(TORCH_SPEC)),$(BIN)/python -m pip install -q $(TORCH_SPEC))
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $@

demo: setup
	$(BIN)/cpsd demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# The lock: every installed version except the project and torch's own stack (TORCH_SPEC).
constraints: setup
	@{ head -3 constraints.txt; $(BIN)/python -m pip freeze | grep -viE '^(-e |cpsd|torch==|torchvision==|nvidia-|triton==|cuda-)' | sort -f; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache runs mlruns mlflow.db
