#!/bin/sh
# Caption evaluation, as the tutorial types it:
#   GPUS=4 sh evaluate.sh pretrained/InternVL2-2B caption-coco --dynamic
#   GPUS=4 sh evaluate.sh work_dirs/internvl_chat_v2_0/<run> caption-coco --dynamic --batch-size 16
# Tasks: caption-coco, caption-flickr30k, caption-nocaps, caption (all three). Options go to
# internvl_chat/cli/evaluate.py (--dynamic, --max-dynamic-patch, --num-beams, --temperature, --out-dir, --seed,
# --auto, --batch-size, --data-root, --spice, --skip-scoring). Environment: GPUS [every GPU there is; 1 process on a
# machine without GPU], MASTER_PORT [a free one], PYTHON, TORCHRUN [python -m internvl_chat.cli.launch]. The checkpoint
# path may be relative or absolute.
set -eu

usage() { echo "usage: GPUS=N sh evaluate.sh CHECKPOINT caption-coco|caption-flickr30k|caption-nocaps|caption [options]" >&2; exit 2; }
[ $# -ge 2 ] || usage
CHECKPOINT=$1
TASK=$2
shift 2

repo=$(cd "$(dirname "$0")" && pwd)
case "$TASK" in
    caption) DATASETS=coco,flickr30k,nocaps ;;
    caption-coco) DATASETS=coco ;;
    caption-flickr30k) DATASETS=flickr30k ;;
    caption-nocaps) DATASETS=nocaps ;;
    *) echo "evaluate.sh: unknown task '$TASK'" >&2; usage ;;
esac

if [ -x "$repo/.venv/bin/python" ]; then PYTHON=${PYTHON:-$repo/.venv/bin/python3}; else PYTHON=${PYTHON:-python3}; fi
. "$repo/shell/gpu_count.sh"
available=$gpu_count
if [ "$available" -gt 0 ]; then GPUS=${GPUS:-$available}; else GPUS=${GPUS:-1}; fi
for arg in "$@"; do
    [ "$arg" = "--auto" ] && GPUS=1  # one process; the model is split over the GPUs
done
case "$GPUS" in ''|*[!0-9]*|0) echo "evaluate.sh: GPUS must be a positive whole number, got '$GPUS'" >&2; exit 2 ;; esac
if [ "$available" -gt 0 ] && [ "$GPUS" -gt "$available" ]; then
    echo "evaluate.sh: GPUS=$GPUS but this machine has $available GPU(s); set GPUS=$available" >&2
    exit 2
fi

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
entry="-m internvl_chat.cli.evaluate"
# The checkpoint, the test sets and Java, checked before any process starts: every problem, one a line.
"$PYTHON" -m internvl_chat.cli.evaluate_arguments --checkpoint "$CHECKPOINT" --datasets "$DATASETS" "$@" || exit $?
[ "$available" -gt 0 ] || echo "[evaluate.sh] no GPU found: captioning on the CPU with $GPUS process(es), float32"

port=""
[ -z "${MASTER_PORT:-}" ] || port="--master_port=$MASTER_PORT"  # else torchrun takes a free one
# shellcheck disable=SC2086  # port is one word or none
if [ -n "${TORCHRUN:-}" ]; then
    set -- "$TORCHRUN" --nnodes=1 --nproc_per_node="$GPUS" $port $entry --checkpoint "$CHECKPOINT" --datasets "$DATASETS" "$@"
else
    set -- "$PYTHON" -m internvl_chat.cli.launch --nnodes=1 --nproc_per_node="$GPUS" $port \
        $entry --checkpoint "$CHECKPOINT" --datasets "$DATASETS" "$@"
fi
exec "$@"
