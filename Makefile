# Two commands that work on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch first, pinned to the release this project is tested with; override for another build.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test bench clean

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/rlr-fast demo --out results/demo

test: install
	$(PY) -m pytest -q tests benchmarks

bench: install
	$(PY) -m pytest benchmarks --benchmark --benchmark-json results/benchmarks.json

clean:
	rm -rf $(VENV) build *.egg-info
