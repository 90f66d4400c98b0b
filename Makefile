# Every target sets up what it needs itself: a virtual environment at .venv, torch's CPU
# build first (a bare `torch` requirement would pull a multi-GB CUDA build), then the
# package with its extras. Re-running is cheap: the stamp file skips finished steps.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) benchmarks/memory_op.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
