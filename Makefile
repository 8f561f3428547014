# The README's two commands: `make demo` and `make test`. Both create .venv if it is
# missing, install the project into it, and make sure Fashion-MNIST (Debian's
# dataset-fashion-mnist) is there when apt is available.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist
SUDO   := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo)
PYTEST_ARGS ?=

.PHONY: demo test install fashion-mnist clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST for the demo and its tests: Debian's package where apt exists; otherwise the
# demo falls back to torchvision's download (see recipes/demo.yaml).
fashion-mnist:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; } || \
	  echo "warning: could not install dataset-fashion-mnist"; \
	fi

demo: $(STAMP) fashion-mnist
	$(BIN)/compresscnn run recipes/demo.yaml --overwrite

# the import layers of pyproject.toml's [tool.importlinter] first (ARCHITECTURE.md), then the suite
test: $(STAMP) fashion-mnist
	$(BIN)/lint-imports --no-logo
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache .import_linter_cache
