# Two commands on a bare clone (each creates .venv and installs what is missing, then only runs):
#     make run     the offline default fine-tuning (scripts/finetune.py; arguments in ARGS="...")
#     make test    the test suite (pytest arguments in PYTEST_ARGS="...")
# The torch build is TORCH, e.g. make test TORCH="torch torchvision --index-url https://download.pytorch.org/whl/cu128"
# (the default pair is the CPU build that CI installs). `make lint` runs ruff.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARGS ?=
PYTEST_ARGS ?=
# DeepSpeed (tests/test_deepspeed.py runs ZeRO-3 on the CPU) has only a source release, whose build imports torch:
# it is installed after torch, without build isolation. DEEPSPEED= leaves it out (uninstalled; its tests then skip).
DEEPSPEED ?= deepspeed==0.19.8

BIN := $(VENV)/bin
# one stamp per TORCH value: another build is installed when TORCH changes
TORCH_STAMP := $(VENV)/.torch-$(shell printf "%s" "$(TORCH)" | cksum | cut -d " " -f 1)
# the package and its dev extras, installed again when pyproject.toml changes
DEV_STAMP := $(VENV)/.dev-installed
# one stamp per DEEPSPEED value, as for TORCH
DEEPSPEED_STAMP := $(VENV)/.deepspeed-$(shell printf "%s" "$(DEEPSPEED)" | cksum | cut -d " " -f 1)

.PHONY: run test lint install

run: install
	$(BIN)/accelerate launch scripts/finetune.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check hf_sp hf_sp_research tests scripts

install: $(DEEPSPEED_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(TORCH_STAMP): | $(BIN)/python
	$(BIN)/python -m pip install $(TORCH)
	rm -f $(VENV)/.torch-* && touch $@

$(DEV_STAMP): pyproject.toml Makefile $(TORCH_STAMP)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

$(DEEPSPEED_STAMP): $(DEV_STAMP)
ifneq ($(strip $(DEEPSPEED)),)
	$(BIN)/python -m pip install setuptools wheel
	$(BIN)/python -m pip install --no-build-isolation "$(DEEPSPEED)"
else
	$(BIN)/python -m pip uninstall -y deepspeed
endif
	rm -f $(VENV)/.deepspeed-* && touch $@
