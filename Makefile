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
# tests fill and share one in .pytest_cache/jax, and compile with LLVM at -O0 and XLA's older
# CPU emitters: tests/_multiprocess.py): 13 min 4 s for 1520 tests on the 2-core VM of
# 2026-12-07 (20-21 min with XLA's fusion emitters). The tests marked default_codegen need XLA's
# default CPU code generation: the second line runs them (4 tests, about 25 s). One process took 1.26x
# as long when last compared (2026-11-26), since compilation is single-threaded. TEST_WORKERS=0
# runs in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)
	KRYLOVJAX_TEST_CODEGEN=default $(PY) -m pytest -q -m 'default_codegen and not slow'

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m slow

bench: $(STAMP)
	$(PY) -m experiments.bench_solvers --json_out=runs/bench_solvers.json

clean:
	rm -rf $(VENV) runs .pytest_cache
