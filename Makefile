# Two entry points: `make demo` (the main job on the synthetic dataset) and `make test`
# (`make test-fast`: the tests not marked slow, with the 15 slowest listed).
# Each does its own set-up: a virtualenv in .venv/ with the pinned dependencies and the
# package installed (editable) with its C++/CUDA extension built. Set-up is idempotent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh) setup.py

.PHONY: demo test test-fast install clean test-compat

install: $(VENV)/.stamp-deps $(VENV)/.stamp-ext

$(VENV)/.stamp-deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools ninja
	$(PIP) install -r requirements.txt
	touch $@

$(VENV)/.stamp-ext: $(VENV)/.stamp-deps $(EXT_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation --no-deps -e .
	touch $@

demo: install
	$(VENV)/bin/fastnl demo

test: install
	$(VENV)/bin/python -m pytest

test-fast: install
	$(VENV)/bin/python -m pytest -m "not slow" --durations=15

# The oldest versions the code supports, as on the GPU machines (torch 2.11, triton 3.6; numpy
# < 2.4 for triton 3.6's CPU interpreter): a second virtualenv, the package used from the
# source tree (the extension JIT-built on first use). Several GB of downloads on first run.
COMPAT_VENV := .venv-compat
# (a python3.12 that runs: a pyenv shim of a version not selected is on PATH but fails)
COMPAT_PYTHON ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || echo $(PYTHON))

$(COMPAT_VENV)/.stamp-deps:
	test -x $(COMPAT_VENV)/bin/python || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/pip install "torch==2.11.*" "triton==3.6.*" "numpy<2.4" timm scipy pyyaml \
		pillow matplotlib tqdm pytest pytest-benchmark ninja
	touch $@

test-compat: $(COMPAT_VENV)/.stamp-deps
	PYTHONPATH=$(CURDIR) FASTNL_BUILD_DIR=$(abspath $(COMPAT_VENV))/build $(COMPAT_VENV)/bin/python -m pytest -p no:cacheprovider

clean:
	rm -rf build *.egg-info fastnl/_C*.so
