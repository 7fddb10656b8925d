# Two commands: `make demo` and `make test`. Each creates .venv when missing and installs the
# package with what it needs; the stamp (named after pyproject.toml's hash) makes a second run
# install nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch and torchvision first, pinned: pip takes them from the local wheel cache here
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/wsi-prune demo --out $(DEMO_OUT)

test: install
	$(BIN)/ruff check wsi_prune tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check wsi_prune tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_tiling.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
