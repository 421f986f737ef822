# Two commands do all the set-up on a fresh machine: `make test` and `make bench`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The pin is the local CPU build here and the CUDA build on a GPU machine. Installing it before the
# package means pip never resolves torch itself (which would pull CUDA wheels onto a CPU box).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.attnlab-installed

# test-quick: the contract in fp32 at one tile setting, the error contract, and every mechanism's unit
# tests, less the torch.compile and gradcheck ones (the contract still checks gradients against the
# oracle): a subset that checks every mechanism, in under a minute on 2 cores.
QUICK_TESTS := tests/contract/test_contract.py tests/contract/test_errors.py tests/mechanisms
QUICK_KEYS  := not float64 and not bfloat16 and not bq16-bk8 and not bq8-bk8 and not compile and not gradcheck

.PHONY: test test-quick bench check lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --disable-pip-version-check -e ".[dev,viz,hf]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-quick: $(STAMP)
	$(PY) -m pytest $(QUICK_TESTS) -k "$(QUICK_KEYS)"

bench: $(STAMP)
	$(VENV)/bin/attnlab bench efficiency

check: $(STAMP)
	$(VENV)/bin/attnlab check

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests && $(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
