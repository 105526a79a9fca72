# Entry points for a fresh machine with Python 3.11 and pip:
#   make demo         create .venv, install the locked runtime, fold + verify a bundled model
#   make test         create .venv, install the locked test environment, run the suite
#   make check        ruff, ruff format, mypy, import-linter and the size limits (CI runs it before test)
#   make test-latest  the same suite in .venv-latest against the newest releases pyproject allows
#   make test-floor   the same suite in .venv-floor on the lower bounds pyproject states
#   make lock         regenerate requirements/*.lock from pyproject.toml (newest allowed releases)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# -qq: pip's own warnings (index locations, editable-install notices) are not the demo's output
PIP_QUIET := -qq
TEST_LOCK := requirements/test.lock
DEMO_LOCK := requirements/demo.lock
PIP_TOOLS := pip-tools==7.6.2
LOCK_VENV := build/lock-venv
LATEST_VENV := .venv-latest
FLOOR_VENV := .venv-floor

.PHONY: demo check test test-latest test-floor lock install install-test clean

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install $(PIP_QUIET) "$$(grep '^pip==' $(TEST_LOCK))"

# Each install is stamped with the lock it came from; a changed lock reinstalls.
$(VENV)/.demo-installed: $(DEMO_LOCK) pyproject.toml | $(BIN)/python
	@$(BIN)/python -m pip install $(PIP_QUIET) -r $(DEMO_LOCK)
	@$(BIN)/python -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	@touch $@

$(VENV)/.test-installed: $(TEST_LOCK) pyproject.toml | $(BIN)/python
	@$(BIN)/python -m pip install $(PIP_QUIET) -r $(TEST_LOCK)
	@$(BIN)/python -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	@touch $@ $(VENV)/.demo-installed

install: $(VENV)/.demo-installed

install-test: $(VENV)/.test-installed

demo: install
	@mkdir -p build
	@$(BIN)/bnfold models/onnx/resnet_small.onnx -o build/resnet_small.folded.onnx

# The house's static checks: lint, format, types, layering, sizes (.ci/run runs them before the tests).
check: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python scripts/check_sizes.py

test: install-test
	$(BIN)/python -m pytest -n 2 -q

# Not part of .ci/run: the newest releases pyproject's ranges admit (torch stays on the local
# 2.13.0 wheel through constraints.txt), to see a dependency's new release break us before users do.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install $(PIP_QUIET) --upgrade --upgrade-strategy eager \
		-c constraints.txt -e ".[test,torch,dev]"
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable
	$(LATEST_VENV)/bin/python -m pytest -n 2 -q -p no:cacheprovider

# Not part of .ci/run: every dependency at the lower bound pyproject states (the bounds must be
# releases the suite passes on).
test-floor:
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	mkdir -p build
	$(PYTHON) scripts/floor_constraints.py test torch > build/floor-constraints.txt
	$(FLOOR_VENV)/bin/python -m pip install $(PIP_QUIET) "$$(grep '^pip==' $(TEST_LOCK))" "$$(grep '^setuptools==' $(TEST_LOCK))"
	$(FLOOR_VENV)/bin/python -m pip install $(PIP_QUIET) -c build/floor-constraints.txt -r build/floor-constraints.txt
	$(FLOOR_VENV)/bin/python -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	$(FLOOR_VENV)/bin/python -m pip freeze --exclude-editable
	$(FLOOR_VENV)/bin/python -m pytest -n 2 -q -p no:cacheprovider

# Regenerates both locks from pyproject.toml, requirements/build.in and constraints.txt, taking the
# newest releases allowed; the demo lock is constrained to the test lock's versions.
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install $(PIP_QUIET) "$(PIP_TOOLS)"
	$(LOCK_VENV)/bin/pip-compile --quiet --upgrade --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --extra test --extra torch --extra dev \
		--constraint constraints.txt --output-file $(TEST_LOCK) pyproject.toml requirements/build.in
	$(LOCK_VENV)/bin/pip-compile --quiet --upgrade --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --constraint $(TEST_LOCK) \
		--output-file $(DEMO_LOCK) pyproject.toml requirements/build.in

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(FLOOR_VENV) build
