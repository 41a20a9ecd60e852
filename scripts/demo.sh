#!/usr/bin/env bash
# The whole LLM-QAT pipeline on the embedded SmolLM2-135M, on CPU, in about 15 minutes:  make demo
#   synthesize data (hybrid sampling) -> evaluate FP and RTN -> QAT (run_train.sh) -> evaluate QAT -> report.
# A rerun reuses the data and the trained student when their settings are unchanged. Sizes are below; raise
# them (environment variables) on a GPU, e.g. NUM_START_TOKENS=2000 SEQ_LEN=1024 make demo.
#   ENGINE=vllm make demo      the data written by vLLM (make vllm first; `make demo` does it then)
#   TEACHER=cached make demo   the data with the teacher's top-32 log-probs, and QAT without loading the teacher
#   SAVE_TOPK=128 TEACHER=cached TOPK=8 make demo   QAT from the top-8 of data saved with the top-128
#   SAVE_TAIL=16 TEACHER=cached make demo   and 16 tokens sampled from the rest of the teacher's distribution
#   SCHEME=NVFP4 KV_SCHEME=FP8 make demo   floating-point formats (compressed-tensors presets) instead of W A KV bits
#   LEARN_RANGES=weights RANGE_LR=1e-3 make demo   learned weight clipping (train.py --learn_ranges)
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEME=${SCHEME:-}                              # e.g. NVFP4: floating-point weights and activations (W, A = 16)
KV_SCHEME=${KV_SCHEME:-}                        # e.g. FP8: floating-point KV cache (KV = 16)
W_BITS=${W_BITS:-$([ -n "$SCHEME" ] && echo 16 || echo 4)} A_BITS=${A_BITS:-$([ -n "$SCHEME" ] && echo 16 || echo 8)}
KV_BITS=${KV_BITS:-$([ -n "$KV_SCHEME" ] && echo 16 || echo 4)}
W_GROUP_SIZE=${W_GROUP_SIZE:-}                  # e.g. 64: group-wise weights (default: per output channel)
KV_PLACEMENT=${KV_PLACEMENT:-pre_rope}          # post_rope: keys quantized after rotary embedding
RECIPE=${RECIPE:-paper}                         # deploy: the grid compressed-tensors / vLLM run (README)
ROTATE=${ROTATE:-none}                          # hadamard / random: rotations before quantizing (README)
LEARN_RANGES=${LEARN_RANGES:-none}              # weights: learned clipping of the weight scales
RANGE_LR=${RANGE_LR:-}                          # their learning rate (default: LEARNING_RATE)
INIT=${INIT:-teacher}                           # gptq (RECIPE=deploy): QAT starts from a GPTQ model (make baselines)
NUM_START_TOKENS=${NUM_START_TOKENS:-96}        # 3 sequences each (greedy prefixes of 3, 4, 5 tokens)
HELDOUT_START_TOKENS=${HELDOUT_START_TOKENS:-8} # their sequences are kept out of training, for evaluation
SEQ_LEN=${SEQ_LEN:-128}                         # tokens per generated sequence and per training example
EPOCHS=${EPOCHS:-1}
LEARNING_RATE=${LEARNING_RATE:-1e-4}
BATCH_SIZE=${BATCH_SIZE:-4}
SEED=${SEED:-0}
ENGINE=${ENGINE:-hf}                            # hf or vllm: which engine writes the data
TEACHER=${TEACHER:-model}                       # model: KD from the teacher; cached: from its saved top-K log-probs
SAVE_TOPK=${SAVE_TOPK:-$([ "$TEACHER" = model ] || echo 32)}  # the data keeps the teacher's top-K (none by default)
TOPK=${TOPK:-$SAVE_TOPK}                        # TEACHER=cached distils from the first TOPK of them
SAVE_TAIL=${SAVE_TAIL:-}                        # and S tokens sampled outside the top-K at each position (HF engine)
TAIL=${TAIL:-$SAVE_TAIL}                        # TEACHER=cached reads the first TAIL of those (0: the rest is one bin)
DATA_DIR=${DATA_DIR:-}                          # default: a folder in OUT named by the data's settings
OUT=${OUT:-demo_output}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}

BITS="${SCHEME:-W${W_BITS}${W_GROUP_SIZE:+g$W_GROUP_SIZE}A${A_BITS}}KV${KV_SCHEME:-$KV_BITS}$([ "$KV_PLACEMENT" = post_rope ] && echo k || true)$([ "$RECIPE" = paper ] || echo "-$RECIPE")$([ "$ROTATE" = none ] || echo "-$ROTATE")"
rtn_options=(--kv-placement "$KV_PLACEMENT" --recipe "$RECIPE" --rotate "$ROTATE")
[ -n "$W_GROUP_SIZE" ] && rtn_options+=(--w-group-size "$W_GROUP_SIZE")
[ -n "$SCHEME" ] && rtn_options+=(--scheme "$SCHEME")
[ -n "$KV_SCHEME" ] && rtn_options+=(--kv-scheme "$KV_SCHEME")
case "$ENGINE/$TEACHER" in
  hf/model|hf/cached|vllm/model|vllm/cached) ;;
  *) echo "[demo] ENGINE=$ENGINE TEACHER=$TEACHER: use ENGINE=hf or vllm, TEACHER=model or cached" >&2; exit 2 ;;
esac
generate_options=(--engine "$ENGINE")
[ -n "$SAVE_TOPK" ] && generate_options+=(--save-topk "$SAVE_TOPK")
[ -n "$SAVE_TAIL" ] && generate_options+=(--save-tail "$SAVE_TAIL")
train_options=()
[ "$LEARN_RANGES" = none ] ||
  train_options+=(--learn_ranges "$LEARN_RANGES" ${RANGE_LR:+--range_learning_rate "$RANGE_LR"})
[ "$TEACHER" = cached ] && train_options+=(--teacher cached --topk "$TOPK" ${TAIL:+--tail_samples "$TAIL"})
DATA_DIR=${DATA_DIR:-"$OUT/data-n${NUM_START_TOKENS}-h${HELDOUT_START_TOKENS}-len${SEQ_LEN}-seed${SEED}$([ "$ENGINE" = hf ] || echo "-$ENGINE")${SAVE_TOPK:+-topk$SAVE_TOPK}${SAVE_TAIL:+-tail$SAVE_TAIL}"}
QAT_DIR="$OUT/qat-${BITS}-$(basename "$DATA_DIR")-ep${EPOCHS}-lr${LEARNING_RATE}-bs${BATCH_SIZE}$([ "$TEACHER" = model ] || echo "-cached$TOPK${TAIL:+-tail$TAIL}")$([ "$LEARN_RANGES" = none ] || echo "-learned-$LEARN_RANGES${RANGE_LR:+-rlr$RANGE_LR}")$([ "$INIT" = teacher ] || echo "-init$INIT")"
GPTQ_DIR="$DATA_DIR/gptq-w${W_BITS}${W_GROUP_SIZE:+g$W_GROUP_SIZE}"  # INIT=gptq: made by run_train.sh once, reused
RESULTS="$OUT/results"
mkdir -p "$OUT" "$RESULTS"
TIMINGS="$OUT/timings.md"
printf '| stage | seconds |\n|---|---:|\n' > "$TIMINGS"
demo_start=$SECONDS

stage() {  # stage NAME COMMAND...: run it, print and record its wall time
  local name=$1 start=$SECONDS
  shift
  echo; echo "[demo] === $name ==="
  "$@"
  echo "[demo] $name took $((SECONDS - start)) s"
  echo "| $name | $((SECONDS - start)) |" >> "$TIMINGS"
}

synthesize() {
  if [ -f "$DATA_DIR/all.jsonl" ]; then
    echo "[demo] reusing $DATA_DIR (same settings as a previous run)"
    return
  fi
  # generate_data.py resumes an interrupted shard by itself; merging is the step that marks the data complete.
  "$PYTHON" generate_data.py --output-dir "$DATA_DIR" --num-start-tokens "$NUM_START_TOKENS" \
    --max-length "$SEQ_LEN" --seed "$SEED" "${generate_options[@]}"
  "$PYTHON" merge_gen_data.py "$DATA_DIR" --output "$DATA_DIR/all.jsonl" --heldout "$HELDOUT_START_TOKENS" \
    --seed "$SEED" --force
}

evaluate() {  # evaluate NAME MODEL [W A KV]
  local name=$1
  shift
  "$PYTHON" scripts/evaluate.py "$@" --tasks none --heldout "$DATA_DIR/heldout.jsonl" --teacher default \
    --max-length "$SEQ_LEN" --output "$RESULTS/$name.json"
}

train() {
  if [ -f "$QAT_DIR/config.json" ]; then
    echo "[demo] reusing the trained student in $QAT_DIR (same settings as a previous run)"
    return
  fi
  DATA="$DATA_DIR/all.jsonl" OUTPUT_DIR="$QAT_DIR" CPU_MAX_LENGTH="$SEQ_LEN" CPU_BATCH_SIZE="$BATCH_SIZE" \
    CPU_LEARNING_RATE="$LEARNING_RATE" CPU_EPOCHS="$EPOCHS" PYTHON="$PYTHON" W_GROUP_SIZE="$W_GROUP_SIZE" \
    KV_PLACEMENT="$KV_PLACEMENT" RECIPE="$RECIPE" ROTATE="$ROTATE" SCHEME="$SCHEME" KV_SCHEME="$KV_SCHEME" \
    INIT="$INIT" GPTQ_DIR="$GPTQ_DIR" \
    bash scripts/run_train.sh "$W_BITS" "$A_BITS" "$KV_BITS" --save_strategy no --seed "$SEED" "${train_options[@]}"
}

stage "1. environment and embedded model" "$PYTHON" -c "from utils.training.loading import embedded_model_dir; print('[demo] teacher cached at', embedded_model_dir())"
stage "2. synthesize data ($NUM_START_TOKENS start tokens x 3, $SEQ_LEN tokens, engine $ENGINE)" synthesize
stage "3a. evaluate FP teacher" evaluate fp default
stage "3b. evaluate RTN $BITS" evaluate "rtn-$BITS" default "$W_BITS" "$A_BITS" "$KV_BITS" "${rtn_options[@]}"
stage "4. QAT $BITS (scripts/run_train.sh, teacher $TEACHER)" train
reported=("$RESULTS/fp.json" "$RESULTS/rtn-$BITS.json")
if [ "$INIT" = gptq ]; then
  stage "4b. evaluate the GPTQ start $BITS" evaluate "gptq-$BITS" "$GPTQ_DIR" "$W_BITS" "$A_BITS" "$KV_BITS" \
    "${rtn_options[@]}"
  reported+=("$RESULTS/gptq-$BITS.json")
fi
stage "5. evaluate QAT $BITS" evaluate "qat-$BITS" "$QAT_DIR"
stage "6. report" "$PYTHON" scripts/compare.py "${reported[@]}" "$RESULTS/qat-$BITS.json" --out "$OUT"
echo "| total | $((SECONDS - demo_start)) |" >> "$TIMINGS"

echo; cat "$OUT/results.md"; echo; cat "$TIMINGS"
echo "[demo] wrote $OUT/results.md and $OUT/results.png"
