# Quick start: `make run` (the main job on embedded defaults) and `make test` (the whole suite).
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# Extra arguments for `make run`, e.g. make run ARGS="--demo -d -i 5"
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup run demo test test-fast compile bench help

help:
	@echo "make run      run the pipeline locally (kfp.local + an embedded S3 server); ARGS=... passes flags"
	@echo "make demo     the same on a synthetic dataset and a random vit_t checkpoint (works offline)"
	@echo "make test     the whole test suite"
	@echo "make compile  recompile pipelines/sam_finetune.yaml"
	@echo "make bench    run the benchmarks (results go to benchmarks/RESULTS.md by hand)"
	@echo "Kubernetes:   make preflight images kind-up kind-load kind-submit kind-schedule kind-down"
	@echo "make images-smoke  build the images and run the compiled steps inside them (needs dockerd)"

# The stamp is remade whenever pyproject.toml changes, so `git pull && make test` picks up new pins.
$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev]'
	@# pip compiles the 5.9 GB it installs (torch and its CUDA libraries) on one core: compiling on all of them
	@# afterwards takes 26 s instead of 47 on 2 cores. A few files are for newer Pythons (torch's
	@# py312_intrinsics.py): they fail to compile here as they do, silently, under pip.
	$(BIN)/python -m compileall -qq -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') || true
	@touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/sam-pipeline run $(ARGS)

demo: setup
	$(BIN)/sam-pipeline run --demo $(ARGS)

# One worker more than the cores (at most four), each taking whole test files, the long ones first (tests/conftest.py).
XDIST  := -n auto --dist loadfile --no-loadscope-reorder

test: setup
	$(BIN)/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" $(PYTEST_ARGS)

compile: setup
	$(BIN)/sam-pipeline compile
	$(BIN)/python -m pipelines.dag_picture

bench: setup
	$(BIN)/python -m benchmarks.ingest
	$(BIN)/python -m benchmarks.train_throughput
	$(BIN)/python -m benchmarks.e2e
	$(BIN)/python -m benchmarks.ops_per_iteration
	$(BIN)/python -m benchmarks.peer_microsam
	$(BIN)/python -m benchmarks.learning_curve

-include mk/kubernetes.mk
