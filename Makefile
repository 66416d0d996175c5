# Two commands that work on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch first, pinned to the release this project is tested with; override for another build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# Test processes for tests/ (pytest-xdist workers, each on one thread; tests/conftest.py): one per
# core of the 2-core machines this project is tested on; `make test JOBS=0` runs them in one process.
# Whole files go to a worker (--dist loadfile), so a module's fixtures (the AOT compile) run once.
# benchmarks/ runs after, in one process: pytest-benchmark times nothing under xdist.
JOBS ?= 2

.PHONY: install browser demo test bench clean

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Chromium for the report page's browser test (tests/test_report.py): Debian's package when none is
# there and we may install it (root and apt-get); otherwise that test skips, saying why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "could not install chromium: the browser test will skip"; \
	    else echo "no chromium: install it (e.g. sudo apt-get install chromium) or the browser test skips"; fi; }

demo: install
	$(VENV)/bin/rlr-fast demo --out results/demo

# The tests marked `engines` (OpenVINO in bf16 and INT8 in the test process) run in a process of
# their own, after the rest: native thread pools of OpenVINO/onnxruntime left in a long-lived pytest
# process were suspected of a crash (exit 139) while a later test compiled Triton kernels in a child.
test: install browser
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile tests -m "not engines"
	$(PY) -m pytest -q benchmarks
	$(PY) -m pytest -q tests -m engines

bench: install
	$(PY) -m pytest benchmarks --benchmark --benchmark-json results/benchmarks.json

clean:
	rm -rf $(VENV) build *.egg-info
