#!/bin/sh
# The common part of the shell/internvl2.0/2nd_finetune/*.sh launchers (they exec this with the model's
# arguments): GPU or CPU, the inputs and the step checked before anything starts, torchrun on the fine-tuning
# entry point, and the log kept in OUTPUT_DIR/training_log.txt. Environment (defaults in brackets):
#   GPUS [8]  processes per host: GPUs, or CPU processes on a machine without a GPU
#   BATCH_SIZE [512]  PER_DEVICE_BATCH_SIZE [4]  global and per-process batch, passed through as --global_batch_size
#       and --per_device_train_batch_size: the entry point takes accumulation = BATCH_SIZE / (PER_DEVICE x processes)
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [a free port on one host, 34229 on several]
#   OUTPUT_DIR (set by the launcher)   PYTHON [.venv's, else PATH's python3]   TORCHRUN [python -m internvl_chat.cli.launch]
#   TORCH_EXTENSIONS_DIR [.cache/torch_extensions in the repository]: DeepSpeed's ops, built on the first launch
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
GPUS=${GPUS:-8}
BATCH_SIZE=${BATCH_SIZE:-512}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-4}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
: "${OUTPUT_DIR:?OUTPUT_DIR must be set by the launcher}"

fail() { echo "launch_finetune: $*" >&2; exit 2; }

if [ -x "$repo/.venv/bin/python" ]; then PYTHON=${PYTHON:-$repo/.venv/bin/python3}; else PYTHON=${PYTHON:-python3}; fi
command -v "$PYTHON" >/dev/null 2>&1 || fail "python not found ($PYTHON): run sh tools/setup_env.sh, or activate your environment"

for name in GPUS BATCH_SIZE PER_DEVICE_BATCH_SIZE NNODES; do
    eval "value=\$$name"
    case "$value" in ''|*[!0-9]*|0) fail "$name must be a positive whole number, got '$value'" ;; esac
done
processes=$((GPUS * NNODES))

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}
export TORCH_EXTENSIONS_DIR LAUNCHER=pytorch TF_CPP_MIN_LOG_LEVEL=3 TOKENIZERS_PARALLELISM=false

. "$repo/shell/gpu_count.sh"
available=$gpu_count
if [ "$available" -gt 0 ]; then
    [ "$GPUS" -le "$available" ] || fail "GPUS=$GPUS but this machine has $available GPU(s); set GPUS=$available (and BATCH_SIZE to match if needed)"
    device_args=""
    # DeepSpeed's op builder cannot parse arch suffixes such as 9.0a
    if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST=$(echo "$TORCH_CUDA_ARCH_LIST" | sed 's/\([0-9]\)a/\1/g')
        export TORCH_CUDA_ARCH_LIST
    fi
    where="$GPUS GPU(s)"
else
    device_args="--use_cpu True --bf16 False"
    cores=$(nproc 2>/dev/null || echo 1)
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / GPUS > 0 ? cores / GPUS : 1 ))}
    DS_ACCELERATOR=cpu  # what DeepSpeed would find itself, after a warning in every process
    export OMP_NUM_THREADS DS_ACCELERATOR
    where="the CPU (no GPU found): $GPUS process(es), gloo, fp32"
fi

# The model, the data, the step and every flag, checked before torchrun starts (a second, not a model load per
# process); every problem is named.
"$PYTHON" -m internvl_chat.cli.finetune_preflight --processes "$processes" "$@" --output_dir "$OUTPUT_DIR" \
    --per_device_train_batch_size "$PER_DEVICE_BATCH_SIZE" --global_batch_size "$BATCH_SIZE" || exit $?

mkdir -p "$OUTPUT_DIR"
log="$OUTPUT_DIR/training_log.txt"
echo "[launch_finetune] $(date '+%F %T') training on $where; BATCH_SIZE=$BATCH_SIZE, PER_DEVICE_BATCH_SIZE=$PER_DEVICE_BATCH_SIZE, $processes process(es); OUTPUT_DIR=$OUTPUT_DIR" | tee -a "$log"

rendezvous="--nnodes=$NNODES --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR"
if [ -n "${MASTER_PORT:-}" ]; then
    rendezvous="$rendezvous --master_port=$MASTER_PORT"
elif [ "$NNODES" -gt 1 ]; then
    rendezvous="$rendezvous --master_port=34229"  # every host must name the same port
fi  # one host and no MASTER_PORT: torchrun takes a free port itself

# POSIX sh has no pipefail: the exit status travels through a file past tee.
status_file="$OUTPUT_DIR/.launch_status"
entry="-m internvl_chat.cli.finetune"
# shellcheck disable=SC2086  # rendezvous and device_args are lists of words
if [ -n "${TORCHRUN:-}" ]; then
    set -- "$TORCHRUN" $rendezvous --nproc_per_node="$GPUS" $entry "$@"
else
    set -- "$PYTHON" -m internvl_chat.cli.launch $rendezvous --nproc_per_node="$GPUS" $entry "$@"
fi
# shellcheck disable=SC2086
{ status=0
  "$@" --output_dir "$OUTPUT_DIR" \
      --per_device_train_batch_size "$PER_DEVICE_BATCH_SIZE" \
      --global_batch_size "$BATCH_SIZE" \
      $device_args || status=$?
  echo "$status" > "$status_file"; } 2>&1 | tee -a "$log"
status=$(cat "$status_file")
rm -f "$status_file"
[ "$status" -eq 0 ] || echo "launch_finetune: training stopped (exit status $status); the log is $log" | tee -a "$log" >&2
exit "$status"
