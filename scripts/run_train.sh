#!/usr/bin/env bash
# LLM-QAT training, the paper's interface:  bash scripts/run_train.sh W A KV [extra train.py arguments]
#   bash scripts/run_train.sh 4 8 4            # W4 A8 KV4 ; 16 = that part not quantized
# Paths are variables below; override any of them from the environment, e.g.
#   MODEL=/models/llama-7b DATA=gen_data/all.jsonl OUTPUT_DIR=output/llama7b-448 bash scripts/run_train.sh 4 8 4
# Quantizer options beyond the paper's: RECIPE=deploy (the grid compressed-tensors runs in transformers) or
# RECIPE=vllm (what vLLM's CPU kernels compute; README "Recipes"), W_GROUP_SIZE=128 (group-wise weights),
# KV_PLACEMENT=post_rope (keys quantized after rotary embedding), ROTATE=hadamard (orthogonal rotations before
# quantizing, for 4-bit activations; with KV below 16 bits it needs KV_PLACEMENT=post_rope); SCHEME=NVFP4 (floating-point
# weights and activations, a compressed-tensors preset, with W A = 16 16) and KV_SCHEME=FP8 (with KV = 16); or any
# train.py flag after the bits. INIT=gptq (with RECIPE=deploy) starts the student from a GPTQ model of the teacher, made
# on the generated data by llm-compressor (make baselines) and kept beside the data (README "Levers beyond the paper").
# On GPUs it prints the memory plan (scripts/plan_memory.py), then launches torchrun over every visible device with
# the released LLaMA-7B recipe (bf16, gradient checkpointing, FSDP full_shard per decoder layer, with CPU offload
# when the plan does not fit, sequence length 2048). On CPU it runs a small, quick
# version of the same training on the embedded SmolLM2-135M (see CPU_* below).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 3 ]; then
  echo "usage: bash scripts/run_train.sh W A KV [train.py arguments]   (bits: 2..8, or 16 for full precision)" >&2
  exit 2
fi
W_BITS=$1 A_BITS=$2 KV_BITS=$3
shift 3
W_GROUP_SIZE=${W_GROUP_SIZE:-}                     # empty = one weight scale per output channel (the paper's)
KV_PLACEMENT=${KV_PLACEMENT:-pre_rope}             # pre_rope (the paper's) or post_rope
RECIPE=${RECIPE:-paper}                            # paper, deploy or vllm
ROTATE=${ROTATE:-none}                             # none (the paper's), hadamard or random
SCHEME=${SCHEME:-}                                 # empty = integer W and A bits; FP8, FP8_DYNAMIC, NVFP4, MXFP4, ...
KV_SCHEME=${KV_SCHEME:-}                           # empty = integer KV bits; FP8 or FP8_TENSOR
INIT=${INIT:-teacher}                              # teacher (the paper's: the teacher's weights) or gptq
BASELINE_PYTHON=${BASELINE_PYTHON:-.venv-baselines/bin/python}   # llm-compressor's environment, for INIT=gptq
options=(--kv_placement "$KV_PLACEMENT" --recipe "$RECIPE" --rotate "$ROTATE")
[ -n "$W_GROUP_SIZE" ] && options+=(--w_group_size "$W_GROUP_SIZE")
[ -n "$SCHEME" ] && options+=(--scheme "$SCHEME")
[ -n "$KV_SCHEME" ] && options+=(--kv_scheme "$KV_SCHEME")

MODEL=${MODEL:-}                                   # teacher; empty = the embedded SmolLM2-135M-Instruct
DATA=${DATA:-gen_data/all.jsonl}                   # merged synthetic data (created below if missing)
BITS_NAME=${SCHEME:-W${W_BITS}${W_GROUP_SIZE:+g$W_GROUP_SIZE}A${A_BITS}}KV${KV_SCHEME:-$KV_BITS}  # e.g. W4A8KV4, NVFP4KVFP8
OUTPUT_DIR=${OUTPUT_DIR:-output/${BITS_NAME}$([ "$KV_PLACEMENT" = post_rope ] && echo k || true)$([ "$RECIPE" = paper ] || echo "-$RECIPE")$([ "$ROTATE" = none ] || echo "-$ROTATE")$([ "$INIT" = teacher ] || echo "-$INIT")}
GPTQ_DIR=${GPTQ_DIR:-$(dirname "$DATA")/gptq-w${W_BITS}${W_GROUP_SIZE:+g$W_GROUP_SIZE}}  # INIT=gptq: made once, reused
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
# CPU-sized settings (a few minutes on 2 cores); the GPU path uses the paper's settings instead.
CPU_MAX_LENGTH=${CPU_MAX_LENGTH:-128}
CPU_BATCH_SIZE=${CPU_BATCH_SIZE:-4}
CPU_LEARNING_RATE=${CPU_LEARNING_RATE:-1e-4}
CPU_EPOCHS=${CPU_EPOCHS:-1}
SAVE_TOTAL_LIMIT=${SAVE_TOTAL_LIMIT:-2}            # checkpoints kept (~80 GB each for 7B with optimizer state)

case "$INIT" in
  teacher) init_arg=() ;;
  gptq)
    init_arg=(--init_from "$GPTQ_DIR")
    if [ ! -f "$GPTQ_DIR/config.json" ] && ! "$BASELINE_PYTHON" -c "import llmcompressor" 2>/dev/null; then
      echo "[run_train] INIT=gptq makes a GPTQ model with llm-compressor, not in $BASELINE_PYTHON: run make baselines" >&2
      exit 2
    fi ;;
  *) echo "[run_train] INIT=$INIT: use INIT=teacher (the paper's) or INIT=gptq" >&2; exit 2 ;;
esac

NUM_GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
model_arg=() model_flag=()
[ -n "$MODEL" ] && model_arg=(--model_name_or_path "$MODEL") && model_flag=(--model "$MODEL")
common=(train.py "${model_arg[@]}" "${init_arg[@]}" --data_path "$DATA" --output_dir "$OUTPUT_DIR"
        --w_bits "$W_BITS" --a_bits "$A_BITS" --kv_bits "$KV_BITS" "${options[@]}"
        --save_total_limit "$SAVE_TOTAL_LIMIT")
if [ "$NUM_GPUS" -gt 0 ]; then
  recipe=(--bf16 --gradient_checkpointing --model_max_length 2048)
else
  recipe=(--model_max_length "$CPU_MAX_LENGTH" --per_device_train_batch_size "$CPU_BATCH_SIZE"
          --learning_rate "$CPU_LEARNING_RATE" --num_train_epochs "$CPU_EPOCHS" --logging_steps 1 --save_steps 50)
fi

# Every flag is checked against the model's config (group size against the layer widths, lengths against its
# positions) before anything long starts: data generation, model loading.
"$PYTHON" "${common[@]}" "${recipe[@]}" "$@" --check_only

if [ ! -f "$DATA" ]; then
  echo "[run_train] $DATA not found: generating synthetic data with the teacher first"
  data_dir=$(dirname "$DATA")
  if [ "$NUM_GPUS" -gt 0 ]; then  # one shard per GPU (the paper preset: every start token, 2048 tokens)
    "$PYTHON" -m torch.distributed.run --nproc_per_node "$NUM_GPUS" generate_data.py "${model_flag[@]}" --output-dir "$data_dir"
  else
    "$PYTHON" generate_data.py "${model_flag[@]}" --output-dir "$data_dir"
  fi
  "$PYTHON" merge_gen_data.py "$data_dir" --output "$DATA"
fi

if [ "$INIT" = gptq ] && [ ! -f "$GPTQ_DIR/config.json" ]; then
  echo "[run_train] making the GPTQ start $GPTQ_DIR (llm-compressor on 128 generated sequences)"
  max_length=$([ "$NUM_GPUS" -gt 0 ] && echo 2048 || echo "$CPU_MAX_LENGTH")
  "$BASELINE_PYTHON" scripts/baseline.py gptq "${model_flag[@]}" --w-bits "$W_BITS" \
    ${W_GROUP_SIZE:+--w-group-size "$W_GROUP_SIZE"} --calibration "$DATA" --max-length "$max_length" \
    --output "$GPTQ_DIR"
fi

if [ "$NUM_GPUS" -gt 0 ]; then
  # FSDP on every GPU count, one included: a 7B student with AdamW (16 bytes/param) fits no single GPU unsharded.
  # The memory plan comes first; CPU offload of weights, gradients and optimizer where the plan does not fit.
  gpu_gib=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)")
  model_dir=$("$PYTHON" -c "import sys; from utils.training.loading import resolve_model_path; print(resolve_model_path(sys.argv[1]))" "$MODEL")
  plan=(scripts/plan_memory.py --model "$model_dir" --gpus "$NUM_GPUS" --gpu-memory "$gpu_gib" --seq-len 2048)
  [[ " $* " == *" --teacher cached "* ]] && plan+=(--teacher cached)   # no teacher to hold: it may fit unoffloaded
  sharding="full_shard auto_wrap"
  if "$PYTHON" "${plan[@]}"; then
    if ! "$PYTHON" "${plan[@]}" --json | "$PYTHON" -c "import json, sys; sys.exit(not json.load(sys.stdin)[0]['fits'])"; then
      echo "[run_train] the plan does not fit: FSDP with CPU offload (--fsdp \"full_shard offload auto_wrap\")"
      sharding="full_shard offload auto_wrap"
    fi
  else
    echo "[run_train] no memory plan for $model_dir (no local config.json?); launching without one" >&2
  fi
  echo "[run_train] $BITS_NAME on $NUM_GPUS GPU(s), torchrun + FSDP ($sharding) -> $OUTPUT_DIR"
  exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NUM_GPUS" "${common[@]}" "${recipe[@]}" \
    --fsdp "$sharding" --fsdp_config scripts/fsdp_config.json "$@"
else
  echo "[run_train] $BITS_NAME on CPU (quick settings) -> $OUTPUT_DIR"
  exec "$PYTHON" "${common[@]}" "${recipe[@]}" "$@"
fi
