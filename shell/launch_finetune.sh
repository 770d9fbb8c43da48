#!/bin/sh
# The common part of the shell/internvl2.0/2nd_finetune/*.sh launchers (they exec this with the model's
# arguments): batch arithmetic, GPU or CPU, torchrun on the fine-tuning entry point, and a log kept in
# OUTPUT_DIR/training_log.txt. Environment (defaults in brackets):
#   GPUS [8]  processes per host: GPUs, or CPU processes on a machine without a GPU
#   BATCH_SIZE [512]  PER_DEVICE_BATCH_SIZE [4]  global and per-process batch; accumulation = the ratio
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [34229]  several hosts
#   OUTPUT_DIR (set by the launcher)   TORCHRUN, PYTHON: commands to use (default: .venv's, else PATH's)
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
GPUS=${GPUS:-8}
BATCH_SIZE=${BATCH_SIZE:-512}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-4}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-34229}
: "${OUTPUT_DIR:?OUTPUT_DIR must be set by the launcher}"

fail() { echo "launch_finetune: $*" >&2; exit 2; }

if [ -x "$repo/.venv/bin/python" ]; then default_bin="$repo/.venv/bin/"; else default_bin=""; fi
PYTHON=${PYTHON:-${default_bin}python3}
TORCHRUN=${TORCHRUN:-${default_bin}torchrun}
command -v "$TORCHRUN" >/dev/null 2>&1 || fail "torchrun not found ($TORCHRUN): run sh tools/setup_env.sh, or activate your environment"

for name in GPUS BATCH_SIZE PER_DEVICE_BATCH_SIZE NNODES; do
    eval "value=\$$name"
    case "$value" in ''|*[!0-9]*|0) fail "$name must be a positive whole number, got '$value'" ;; esac
done
processes=$((GPUS * NNODES))
per_step=$((PER_DEVICE_BATCH_SIZE * processes))
[ $((BATCH_SIZE % per_step)) -eq 0 ] || fail "BATCH_SIZE=$BATCH_SIZE is not a multiple of PER_DEVICE_BATCH_SIZE x GPUS x NNODES = $per_step"
GRADIENT_ACC=$((BATCH_SIZE / per_step))

mkdir -p "$OUTPUT_DIR"
log="$OUTPUT_DIR/training_log.txt"
available=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$available" -gt 0 ]; then
    [ "$GPUS" -le "$available" ] || fail "GPUS=$GPUS but this machine has $available GPU(s); set GPUS=$available (and BATCH_SIZE to match if needed)"
    device_args=""
    # DeepSpeed's op builder cannot parse arch suffixes such as 9.0a
    if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST=$(echo "$TORCH_CUDA_ARCH_LIST" | sed 's/\([0-9]\)a/\1/g')
        export TORCH_CUDA_ARCH_LIST
    fi
else
    echo "[launch_finetune] no GPU found: training on the CPU with $GPUS process(es), gloo, fp32" | tee -a "$log"
    device_args="--use_cpu True --bf16 False"
    cores=$(nproc 2>/dev/null || echo 1)
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / GPUS > 0 ? cores / GPUS : 1 ))}
    export OMP_NUM_THREADS
fi

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export LAUNCHER=pytorch TF_CPP_MIN_LOG_LEVEL=3 TOKENIZERS_PARALLELISM=false
echo "[launch_finetune] $(date '+%F %T') GPUS=$GPUS NNODES=$NNODES BATCH_SIZE=$BATCH_SIZE PER_DEVICE_BATCH_SIZE=$PER_DEVICE_BATCH_SIZE GRADIENT_ACC=$GRADIENT_ACC OUTPUT_DIR=$OUTPUT_DIR" | tee -a "$log"

# POSIX sh has no pipefail: the exit status of torchrun travels through a file past tee.
status_file=$(mktemp)
# shellcheck disable=SC2086  # device_args is a list of words
{ status=0
  "$TORCHRUN" --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
      --nproc_per_node="$GPUS" --master_port="$MASTER_PORT" \
      "$repo/internvl_chat/train/internvl_chat_finetune.py" "$@" \
      --output_dir "$OUTPUT_DIR" \
      --per_device_train_batch_size "$PER_DEVICE_BATCH_SIZE" \
      --gradient_accumulation_steps "$GRADIENT_ACC" \
      $device_args || status=$?
  echo "$status" > "$status_file"; } 2>&1 | tee -a "$log"
status=$(cat "$status_file")
rm -f "$status_file"
exit "$status"
