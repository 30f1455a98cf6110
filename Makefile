# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv and installs the CPU build of torch (a plain `pip install torch` would
# pull several GB of CUDA wheels).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench gpu-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/nmsparse train

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/overhead.py

# The GPU check (docs/gpu.md): on the GPU machine, with its own python3 (torch, Triton; no
# network, so no .venv): `make gpu-check OUT=DIR`. `make gpu-check DRY=1 OUT=DIR` runs it
# anywhere with fixture numbers and no GPU call, in .venv.
OUT ?= gpu-check-out
GPU_PYTHON ?= $(if $(DRY),$(BIN)/python,python3)
gpu-check: $(if $(DRY),$(BIN)/.installed)
	$(GPU_PYTHON) -m benchmarks.gpu_check --out "$(OUT)" $(if $(DRY),--dry-run)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache .hypothesis
