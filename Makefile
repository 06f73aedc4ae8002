# dmriharmony: two commands, `make demo` and `make test`, on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; installed first so the pyproject range is already satisfied
# (any other version pulls a multi-GB CUDA build). Users with GPUs bring their own torch.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo_output

.PHONY: venv install install-test demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

venv: $(BIN)/python
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python -m dmriharmony.demo $(DEMO_OUT) --nprocs 2

test: install-test
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check dmriharmony tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
