# meal-cache: `make all` reproduces the default run, `make test` runs the tests; both install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install all test lint bench gpu-check mutants clean

install: $(STAMP)

# Reinstall only when the package's metadata changes; the package itself is installed editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The default reproducible pipeline; `make all PIPELINE=pipelines/other.toml` runs another. A second run skips
# every step whose settings and inputs are unchanged.
PIPELINE ?= pipelines/digits.toml
all: install
	$(BIN)/meal-cache run $(PIPELINE)

# Two workers, one torch thread each (tests/conftest.py), whole modules to a worker so module fixtures run once:
# the suite is sized for a 2-core machine.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

lint: install
	$(BIN)/ruff check meal_cache tests benchmarks examples
	$(BIN)/ruff format --check meal_cache tests benchmarks examples

# Speed and size as ratios measured in one run; writes bench/results.json and prints the table.
# `make bench BENCH_DEVICE=cuda` measures extraction on the GPU and prints its images per second.
bench: install
	$(BIN)/python benchmarks/bench.py --out bench/results.json $(if $(BENCH_DEVICE),--device $(BENCH_DEVICE))

# On a lent GPU, one prepared command: the cuda-marked tests (tests/test_cuda.py), then 224 px extract, distill and
# plain torchvision images/s and peak GPU memory; writes gpu/results.json. Without CUDA it says so and exits 0.
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --out gpu/results.json

# Mutation testing of one module with mutmut (benchmarks/mutants.py): `make mutants MODULE=meal_cache/dense.py`;
# TESTS="tests/test_a.py tests/test_b.py" replaces the tests that cover it, JOBS=2 tests two mutants at once,
# ONLY="decode_topk TeacherStore.read" mutates only those functions.
# Works in mutants/ (git-ignored) and prints the survivors as file:line with the change.
mutants: install
	$(BIN)/python benchmarks/mutants.py $(MODULE) $(if $(TESTS),--tests $(TESTS)) $(if $(JOBS),--jobs $(JOBS)) $(if $(ONLY),--only $(ONLY))

clean:
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
