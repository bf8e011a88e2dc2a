# oni-sys: every target sets up .venv first if it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU wheel by default (a plain `pip install torch` pulls a multi-GB CUDA build); GPU users
# override it: make setup TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'
TORCH  ?= torch==2.13.0
EXTRAS ?= nethack,llamacpp,pettingzoo,plots,dev
STAMP  := $(VENV)/.installed-$(EXTRAS)

# The main job: ONI (hashing rewards, embedded Gemma 3 270M annotator, Ray runtime) on
# NetHackScore for a bounded budget (about 10 minutes on 2 CPU cores).
TRAIN_CONFIG ?= configs/oni/small/score_hashing.yaml
TRAIN_ARGS   ?= name=oni_score_hashing train.total_env_steps=450000

.PHONY: setup train test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

train: setup
	$(BIN)/oni-sys train $(TRAIN_CONFIG) $(TRAIN_ARGS)

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -ra

bench: setup
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
