# meal-cache: `make all` reproduces the default run, `make test` runs the tests; both install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install all test lint bench clean

install: $(STAMP)

# Reinstall only when the package's metadata changes; the package itself is installed editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Until the pipeline runner lands: the default teachers on digits and their cache. Both resume, so a second
# `make all` only checks that everything is there.
RUN := runs/digits
all: install
	$(BIN)/meal-cache train --arch resnet20 --data digits --epochs 15 --resume --out $(RUN)/teachers/resnet20.pt
	$(BIN)/meal-cache train --arch densenet_k12 --data digits --epochs 15 --resume --out $(RUN)/teachers/densenet_k12.pt
	$(BIN)/meal-cache evaluate $(RUN)/teachers/resnet20.pt
	$(BIN)/meal-cache evaluate $(RUN)/teachers/densenet_k12.pt
	$(BIN)/meal-cache extract --teachers resnet20,densenet_k12 --teacher-dir $(RUN)/teachers --data digits \
		--views 8 --identity-view --out $(RUN)/feats.zarr

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check meal_cache tests
	$(BIN)/ruff format --check meal_cache tests

clean:
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
