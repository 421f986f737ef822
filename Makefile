# Two commands do all the set-up on a fresh machine: `make test` and `make bench`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The pin is the local CPU build here and the CUDA build on a GPU machine. Installing it before the
# package means pip never resolves torch itself (which would pull CUDA wheels onto a CPU box).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.attnlab-installed

.PHONY: test bench check lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --disable-pip-version-check -e ".[dev,viz,hf]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(VENV)/bin/attnlab bench efficiency

check: $(STAMP)
	$(VENV)/bin/attnlab check

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests && $(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
