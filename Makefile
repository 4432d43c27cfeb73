# Two commands do all the set-up on a fresh machine:
#   make demo   runs the main job on the built-in default
#   make test   runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.krylovjax-installed

.PHONY: demo test test-slow bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The demo always runs afresh in runs/demo; the previous run there is kept in runs/demo.prev
# (--fresh: the binary moves it aside itself while holding the directory's lock, so a second
# `make demo` started during a run is refused instead of moving the running one away).
demo: $(STAMP)
	$(PY) -m experiments.denoise --config=experiments/configs/denoise_demo.py --workdir=runs/demo --fresh

# Two pytest workers (pytest-xdist). From an empty persistent compilation cache, as in CI (the
# tests fill and share one in .pytest_cache/jax, and compile with LLVM at -O0: tests/conftest.py):
# 9 min 17 s - 10 min 22 s on the idle 2-core machine (2026-11-27, before -O0); on 2026-11-28's
# VMs, 3.2-3.6x slower per training step, 26 min 38 s before -O0 and 18 min 38 s with it;
# 8 min 27 s (636 tests) on 2026-12-04's VM.
# One process took 1.26x as long when last compared (2026-11-26), since compilation is
# single-threaded. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m slow

bench: $(STAMP)
	$(PY) -m experiments.bench_solvers --json_out=runs/bench_solvers.json

clean:
	rm -rf $(VENV) runs .pytest_cache
