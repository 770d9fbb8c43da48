#!/bin/sh
# GPU check of the tutorial's fine-tuning launcher on a random full-size InternVL2-2B and COCO-shaped synthetic
# data (640x480 pictures -> 7 tiles, ~12-word captions), DeepSpeed ZeRO-1, bf16, default attention.
#   GPUS=1 STEPS=30 sh tools/gpu/finetune_check.sh OUT_DIR
#   GPUS=8 NAME=fast_gpus8 sh tools/gpu/finetune_check.sh OUT_DIR --supervised_logits_only True \
#       --grad_checkpoint False --compile_blocks True --group_by_image True     # the fastest mode
#   GPUS=1 NAME=grouped sh tools/gpu/finetune_check.sh OUT_DIR ... --profile_steps 20,22   # where the time goes
# Leaves OUT_DIR/<NAME>_training_log.txt, OUT_DIR/<NAME>_trainer_state.json and, with --profile_steps,
# OUT_DIR/<NAME>_profile_steps_FIRST-LAST.txt (NAME defaults to gpus<N>).
set -eu
out=${1:?usage: sh tools/gpu/finetune_check.sh OUT_DIR [extra launcher flags]}
shift
GPUS=${GPUS:-1}
NAME=${NAME:-gpus$GPUS}
STEPS=${STEPS:-30}
BATCH_SIZE=${BATCH_SIZE:-16}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-4}
work=${WORK:-/tmp/finetune_check}
python=${PYTHON:-python3}
# The device machine has no installed package: the checkout itself is importable.
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out" "$work"

if [ ! -f "$work/InternVL2-2B/config.json" ]; then
    "$python" tools/make_tiny_model.py "$work/InternVL2-2B" --like InternVL2-2B --device cuda
fi
if [ ! -f "$work/meta.json" ]; then
    images=$(( STEPS * BATCH_SIZE + 20 ))  # enough pictures when --group_by_image makes BATCH_SIZE count them
    "$python" tools/make_synthetic_coco.py --out "$work/coco" --train-images "$images" --test-images 10 \
        --image-size 640x480 --meta "$work/meta.json"
fi
run="$work/run_$NAME"
rm -rf "$run"
keep_logs() {  # also when stopped (e.g. by `timeout`): the log so far is what tells why
    [ -f "$run/training_log.txt" ] && cp "$run/training_log.txt" "$out/${NAME}_training_log.txt"
    [ -f "$run/trainer_state.json" ] && cp "$run/trainer_state.json" "$out/${NAME}_trainer_state.json"
    for profile in "$run"/profile_steps_*.txt; do  # from --profile_steps FIRST,LAST
        [ -f "$profile" ] && cp "$profile" "$out/${NAME}_$(basename "$profile")"
    done
    return 0
}
trap 'keep_logs; exit 143' TERM INT
GPUS=$GPUS BATCH_SIZE=$BATCH_SIZE PER_DEVICE_BATCH_SIZE=$PER_DEVICE_BATCH_SIZE MODEL="$work/InternVL2-2B" \
META_PATH="$work/meta.json" OUTPUT_DIR="$run" \
    sh shell/internvl2.0/2nd_finetune/internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_lora_coco.sh \
    --max_steps "$STEPS" --save_strategy no --dataloader_num_workers 8 "$@" || status=$?
keep_logs
exit "${status:-0}"
