# Two commands are the contract with users (see README): `make demo` and `make test`.
# Both print little unless something fails: the install's output goes to $(VENV)/install.log, and its last lines
# are shown only when it fails (pip may print a warning per ignored location of the machine's pip config).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INSTALL_LOG := $(VENV)/install.log

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	@echo "installing semimed and its dependencies into $(VENV) (a few minutes the first time; log: $(INSTALL_LOG))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch/torchvision pinned to the releases this lab is tested with (a CUDA build, fine on CPU).
	@{ export PIP_DISABLE_PIP_VERSION_CHECK=1; \
	   $(BIN)/python -m pip install --upgrade pip \
	   && $(BIN)/python -m pip install "torch==2.14.1" "torchvision==0.29.1" \
	   && $(BIN)/python -m pip install -e ".[dev,all]"; } >$(INSTALL_LOG) 2>&1 \
	|| { grep -v "^WARNING: Location .* is ignored" $(INSTALL_LOG) | tail -n 40; \
	     echo "make: the install failed; the whole log is $(INSTALL_LOG)"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@$(BIN)/semimed demo

lint: $(STAMP)
	@$(BIN)/ruff check --quiet semimed tests scripts
	@$(BIN)/ruff format --check --quiet semimed tests scripts

test: lint
	@HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache semimed_demo
