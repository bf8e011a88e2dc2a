# oni-sys: every target sets up .venv first if it is missing or out of date.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU wheel by default (a plain `pip install torch` pulls a multi-GB CUDA build); GPU users
# override it: make setup TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126'
TORCH  ?= torch==2.13.0
EXTRAS ?= ray,nethack,llamacpp,pettingzoo,plots,dev
STAMP  := $(VENV)/.installed-$(EXTRAS)

# llama-cpp-python compiles llama.cpp when installed, by default with -march=native: a venv built
# on one CPU then uses whatever that CPU has (AVX-512, AMX), and ggml's AMX kernels segfault on
# the first decode of a Q4_K_M model on Sapphire Rapids (llama.cpp issue 20824). So it is built
# for the x86-64 baseline (AVX, AVX2, FMA, F16C, BMI2; no AVX-512, AVX-VNNI or AMX) unless you
# opt into tuning for this machine's CPU: make setup LLAMA_NATIVE=1
LLAMA_NATIVE ?= 0
LLAMA_CPP    ?= llama-cpp-python>=0.3
ifneq ($(filter 1 yes true on ON,$(LLAMA_NATIVE)),)
LLAMA_BUILD      := native
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON
else
LLAMA_BUILD      := portable
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
                    -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
                    -DGGML_AMX_BF16=OFF
endif
# The build llama-cpp-python in .venv was made with, recorded after it was built. When it differs
# from the one asked for (or is missing: a venv made another way) setup rebuilds llama-cpp-python;
# pip's wheel cache is keyed by the sdist only (not CMAKE_ARGS), hence --no-cache-dir; and
# --no-binary, so that a prebuilt wheel of unknown flags is never taken instead of compiling.
LLAMA_STAMP := $(VENV)/.llama-cpp-build
LLAMA_WANT  := $(LLAMA_BUILD) $(LLAMA_CPP) $(LLAMA_CMAKE_ARGS)
comma := ,
ifneq ($(filter llamacpp,$(subst $(comma), ,$(EXTRAS))),)
ifneq ($(strip $(shell cat $(LLAMA_STAMP) 2>/dev/null)),$(strip $(LLAMA_WANT)))
LLAMA_REBUILD := 1
$(STAMP): FORCE
endif
endif

# The main job: ONI (hashing rewards, embedded Gemma 3 270M annotator, Ray runtime) on
# NetHackScore for a bounded budget (10 to 20 minutes on 2 CPU cores).
TRAIN_CONFIG ?= configs/oni/small/score_hashing.yaml
TRAIN_ARGS   ?= name=oni_score_hashing train.total_env_steps=450000

.PHONY: setup train test lint format bench bench-sf clean FORCE

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
ifdef LLAMA_REBUILD
	@echo "building $(LLAMA_CPP), $(LLAMA_BUILD) build (compiles llama.cpp: several minutes)"
	rm -f $(LLAMA_STAMP)
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/python -m pip install --quiet --force-reinstall \
		--no-deps --no-cache-dir --no-binary llama-cpp-python '$(LLAMA_CPP)'
	echo '$(LLAMA_WANT)' > $(LLAMA_STAMP)
endif
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

# ONI_SYS_LLAMA_BUILD tells the tests which llama.cpp build was asked for (a native one skips
# tests/annotators/test_portable_build.py, loudly).
test: lint
	ONI_SYS_LLAMA_BUILD=$(LLAMA_BUILD) $(BIN)/python -m pytest -ra

bench: setup
	$(BIN)/python benchmarks/throughput.py

# oni-sys against sample-factory 2.1.1 on NetHackScore, alternating runs (makes .venv-sf first:
# sample-factory needs gymnasium 0.29 and numpy<2, so it cannot share .venv).
bench-sf: setup
	$(BIN)/python benchmarks/vs_sample_factory.py --default-network

clean:
	rm -rf $(VENV) .venv-sf build *.egg-info .pytest_cache .ruff_cache

FORCE:
