# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test wheel-check lint lab-up lab-down bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,torch,dev]'
	# QAT's tf-keras/tfmot, without the second TensorFlow their metadata asks for (see edgeq/qat/deps.py).
	$(PY) -m edgeq.qat.deps install
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

# Build the wheel, install it into a fresh venv outside the checkout, list profiles, convert and bench there.
wheel-check: $(STAMP)
	PYTHON=$(abspath $(PY)) bash .ci/wheel-check

lint: $(STAMP)
	$(VENV)/bin/ruff check edgeq tests benchmarks examples

lab-up: $(STAMP)
	$(PY) tests/lab/lab.py up

# Stopping needs no (re)install: use the venv's python when there is one.
lab-down:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) tests/lab/lab.py down

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out
