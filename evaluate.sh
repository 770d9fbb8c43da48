#!/bin/sh
# Caption evaluation, as the tutorial types it:
#   GPUS=4 sh evaluate.sh pretrained/InternVL2-2B caption-coco --dynamic
#   GPUS=4 sh evaluate.sh work_dirs/internvl_chat_v2_0/<run> caption-coco --dynamic --batch-size 16
# Tasks: caption-coco, caption-flickr30k, caption-nocaps, caption (all three). Options go to
# internvl_chat/eval/evaluate_caption.py (--dynamic, --max-dynamic-patch, --num-beams, --temperature, --out-dir, --seed,
# --auto, --batch-size, --data-root, --spice, --skip-scoring). Environment: GPUS [8] (processes; CPU processes
# on a machine without GPU), MASTER_PORT [63669], TORCHRUN, PYTHON. The checkpoint path may be relative or absolute.
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
[ -d "$CHECKPOINT" ] || { echo "evaluate.sh: checkpoint folder '$CHECKPOINT' does not exist" >&2; exit 2; }

GPUS=${GPUS:-8}
for arg in "$@"; do
    [ "$arg" = "--auto" ] && GPUS=1  # one process; the model is split over the GPUs
done
case "$GPUS" in ''|*[!0-9]*|0) echo "evaluate.sh: GPUS must be a positive whole number, got '$GPUS'" >&2; exit 2 ;; esac

if [ -x "$repo/.venv/bin/python" ]; then default_bin="$repo/.venv/bin/"; else default_bin=""; fi
PYTHON=${PYTHON:-${default_bin}python3}
TORCHRUN=${TORCHRUN:-${default_bin}torchrun}
available=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$available" -gt 0 ] && [ "$GPUS" -gt "$available" ]; then
    echo "evaluate.sh: GPUS=$GPUS but this machine has $available GPU(s); set GPUS=$available" >&2
    exit 2
fi
[ "$available" -gt 0 ] || echo "[evaluate.sh] no GPU found: captioning on the CPU with $GPUS process(es), float32"

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$TORCHRUN" --nnodes=1 --node_rank=0 --master_addr=127.0.0.1 --nproc_per_node="$GPUS" \
    --master_port="${MASTER_PORT:-63669}" \
    "$repo/internvl_chat/eval/evaluate_caption.py" --checkpoint "$CHECKPOINT" --datasets "$DATASETS" "$@"
