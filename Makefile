# Two entry points: `make demo` (the main job on the synthetic dataset) and `make test`.
# Each does its own set-up: a virtualenv in .venv/ with the pinned dependencies and the
# package installed (editable) with its C++/CUDA extension built. Set-up is idempotent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h) setup.py

.PHONY: demo test install clean

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

clean:
	rm -rf build *.egg-info fastnl/_C*.so
