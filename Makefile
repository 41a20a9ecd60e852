# make demo : set up, then the whole LLM-QAT pipeline on the embedded SmolLM2-135M (CPU, ~15 min)
# make test : set up, then the test suite
# make table: set up (with the llm-compressor baselines), then the paper's eight-row table (CPU, ~85 min)
# make lock : re-resolve every environment's packages into locks/ (then run the tests and commit the locks)
PYTHON ?= python3
VENV := .venv
PIP_VERSION := 26.3
# Every environment installs from its lock (locks/*.txt: every package, transitive ones included, at an exact
# version), so a clean clone installs the same packages whatever was released upstream since. On a GPU machine
# install your CUDA build of torch into .venv first and run `make setup KEEP_TORCH=1`: the rest of the lock applies.
KEEP_TORCH ?=

.PHONY: setup baselines peers vllm test demo table bench lock clean

setup: $(VENV)/.installed

# $(1): the venv, $(2): its lock, $(3): the pyproject extra whose code it needs (none: the main packages)
define make_env
	$(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet "pip==$(PIP_VERSION)"
	$(if $(KEEP_TORCH),grep -v '^torch==' $(2),cat $(2)) > $(1)/lock.txt
	$(1)/bin/pip install --quiet --no-deps -r $(1)/lock.txt   # exactly the lock: nothing resolved here
	$(1)/bin/pip install --quiet --no-deps -e .   # the packages models/ and utils/ themselves
	touch $(1)/.installed
endef

$(VENV)/.installed: locks/main.txt pyproject.toml
	$(call make_env,$(VENV),locks/main.txt)

# GPTQ / SmoothQuant (scripts/baseline.py): llm-compressor pins transformers <= 5.17, so it gets its own environment.
baselines: .venv-baselines/.installed

.venv-baselines/.installed: locks/baselines.txt pyproject.toml
	$(call make_env,.venv-baselines,locks/baselines.txt)

# torchao's QAT as a peer (bench/bench_peers.py), beside this project's packages.
peers: .venv-peers/.installed

.venv-peers/.installed: locks/peers.txt pyproject.toml
	$(call make_env,.venv-peers,locks/peers.txt)

# vLLM's CPU build (scripts/serve_check.py): it pins transformers < 5.20 and compressed-tensors 0.17, so it gets its own
# environment; its torchvision, torchaudio and torchcodec wheels break `import transformers` and are left out.
vllm: .venv-vllm/.installed

.venv-vllm/.installed: locks/vllm.txt pyproject.toml
	$(call make_env,.venv-vllm,locks/vllm.txt)

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest -q   # the tests never need the network

# ENGINE=vllm make demo: the data written by vLLM, whose environment it builds first
demo: setup $(if $(filter vllm,$(ENGINE)),vllm)
	bash scripts/demo.sh

table: setup baselines
	bash scripts/paper_table.sh

bench: setup
	$(VENV)/bin/python bench/bench_generate.py
	$(VENV)/bin/python bench/bench_train.py

# requirements.txt and pyproject.toml say what is allowed; the locks say what is installed.
lock:
	bash scripts/lock.sh main
	bash scripts/lock.sh baselines baselines
	bash scripts/lock.sh peers bench
	bash scripts/lock.sh vllm vllm torchvision torchaudio torchcodec

clean:
	rm -rf demo_output output gen_data table_output
