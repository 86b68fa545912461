# Quick start:  make demo   (the embedded default end to end on this CPU)
#               make sweep  (toy latent-scaling reproduction, ~35 min on 2 cores; SWEEP_ARGS=...)
#               make test   (the test suite; tiers by marker, see README); make lint (ruff)
# Every target sets itself up first; `make setup` is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
SWEEP_DIR ?= runs/sweep
SWEEP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint demo sweep bench clean

setup: $(STAMP)

# torch first, from its pinned CPU wheel: with torch present nothing else pulls a CUDA build.
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$$(grep '^torch==' requirements.txt)"
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "unit or fidelity" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

demo: setup
	$(PY) -m pipeline.demo --out $(DEMO_DIR)

# Resumes an interrupted sweep; SWEEP_ARGS="--fresh" starts over (python -m pipeline.sweep --help)
sweep: setup
	$(PY) -m pipeline.sweep --out $(SWEEP_DIR) $(SWEEP_ARGS)

# Benchmarks P1-P5, P7, P8 on this machine (several minutes); P6 needs a GPU: python -m pipeline.bench gpu
bench: setup
	$(PY) -m data_prep.bench
	$(PY) -m pipeline.bench latent
	$(PY) -m pipeline.bench generate
	$(PY) -m pipeline.bench zero
	$(PY) -m pipeline.bench overhead

clean:
	rm -rf runs/demo .pytest_cache
