# Two commands on a fresh machine: `make train` and `make test`.
# torch 2.14.1 + torchvision 0.29.1 is the pair that installs offline here and lets timm import
# (see DEVELOPERS.md); `make train` needs only torch.
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
TORCH  ?= torch==2.14.1
TORCHVISION ?= torchvision==0.29.1
ARGS   ?=

.PHONY: train test lint bench clean

$(VENV)/.core: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[plot]"
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) install -q "$(TORCH)" "$(TORCHVISION)"
	$(PIP) install -q -e ".[dev,plot,demo,export,tensorboard]"
	touch $@

train: $(VENV)/.core
	$(VENV)/bin/vitlab train $(ARGS)

test: $(VENV)/.dev
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info
