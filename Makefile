# dmriharmony: two commands, `make demo` and `make test`, on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; installed first so the pyproject range is already satisfied
# (any other version pulls a multi-GB CUDA build). Users with GPUs bring their own torch.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo_output

.PHONY: venv install install-test system-deps demo test lint clean

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

# Debian packages some tests use (headless Chromium for the report test); best effort: skipped
# without root/apt, and the tests that need them skip with a reason.
SYSTEM_PACKAGES ?= chromium
system-deps:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "could not install$$missing: tests that need them will skip"; \
	  fi; \
	else echo "system-deps: not root or no apt-get; tests needing $(SYSTEM_PACKAGES) will skip"; fi

test: install-test system-deps
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check dmriharmony tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
