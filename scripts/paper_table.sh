#!/usr/bin/env bash
# The paper's table as one command:  bash scripts/paper_table.sh   (or: make table)
#   for every W-A-KV row: FP, RTN, GPTQ, SmoothQuant and LLM-QAT, then table_output/table.md, table.csv, table.png.
# Every setting is a variable (defaults in scripts/paper_table.py --help), e.g.
#   ROWS="4-8-4 8-8-8" bash scripts/paper_table.sh                       # two rows
#   ABLATIONS="data loss" REAL_TEXT=wiki.txt bash scripts/paper_table.sh # and the ablation table
#   ROWS="4-4-4 4-8-4" ROTATE=hadamard bash scripts/paper_table.sh       # and RTN / LLM-QAT + rotation
#   MODEL=/models/llama-7b bash scripts/paper_table.sh                   # on GPUs: the paper's sizes
# A rerun resumes: finished cells are kept (table_output/cells, models, data) and only printed again.
# GPTQ and SmoothQuant need llm-compressor in its own environment: make baselines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}

args=()
add() { [ -n "$2" ] && args+=("$1" $2) || true; }   # $2 unquoted: ROWS / ABLATIONS hold several words
add --model "${MODEL:-}"
add --rows "${ROWS:-}"
add --out "${OUT:-}"
add --num-start-tokens "${NUM_START_TOKENS:-}"
add --heldout-start-tokens "${HELDOUT_START_TOKENS:-}"
add --seq-len "${SEQ_LEN:-}"
add --epochs "${EPOCHS:-}"
add --learning-rate "${LEARNING_RATE:-}"
add --batch-size "${BATCH_SIZE:-}"
add --seed "${SEED:-}"
add --tasks "${TASKS:-}"
add --text-file "${TEXT_FILE:-}"
add --baseline-python "${BASELINE_PYTHON:-}"
add --calibration-samples "${CALIBRATION_SAMPLES:-}"
add --smoothing-strength "${SMOOTHING_STRENGTH:-}"
add --rotate "${ROTATE:-}"
add --ablations "${ABLATIONS:-}"
add --ablation-bits "${ABLATION_BITS:-}"
add --real-text "${REAL_TEXT:-}"
exec "$PYTHON" scripts/paper_table.py --python "$PYTHON" "${args[@]}" "$@"
