# Two entry points for a fresh machine with Python 3.11 and pip:
#   make demo   create .venv, install bnfold, fold + verify a bundled model, print the report
#   make test   create .venv, install bnfold with test extras (torch pinned), run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test,torch]"

demo: install
	mkdir -p build
	$(BIN)/bnfold models/onnx/resnet_small.onnx -o build/resnet_small.folded.onnx

test: install-test
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) build
