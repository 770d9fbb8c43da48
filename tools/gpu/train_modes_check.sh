#!/bin/sh
# One device call for the training modes: the CUDA-only tests (flex attention's, the prefix split's and packed
# rows' loss and LoRA gradients against SDPA, eager and compiled), then benchmark_train's table on a random full-size
# InternVL2-2B built once.
#   sh tools/gpu/train_modes_check.sh OUT_DIR     # faithful; per caption, padded and packed; grouped: split, flex, SDPA
#   PICTURES=8 BATCH=8 MODES=faithful,supervised_logits+no_checkpointing+compile \
#       sh tools/gpu/train_modes_check.sh OUT_DIR
# Environment: PICTURES, BATCH (fast per-caption modes; the faithful mode keeps 4), LENGTH_MULTIPLE, PAD_MULTIPLE,
# STEPS, WARMUP, MODES, TESTS (the tests' -k expression, or none), WORK, DEVICE, PYTHON. Pytest is installed from .whl/ when the machine lacks it (carry .whl). Leaves OUT_DIR/tests.txt,
# OUT_DIR/benchmark_train.txt and OUT_DIR/benchmark_train.json.
set -u
out=${1:?usage: sh tools/gpu/train_modes_check.sh OUT_DIR}
python=${PYTHON:-python3}
work=${WORK:-/tmp/train_modes_check}
per_caption=supervised_logits+no_checkpointing+compile
grouped=shared_image+$per_caption
MODES=${MODES:-faithful,$per_caption,packed+$per_caption,$grouped,flex+$grouped,sdpa+$grouped}  # grouped: prefix split
mkdir -p "$out" "$work"

TESTS=${TESTS:-flex or split or packed}
if [ "$TESTS" != none ]; then
    if ! "$python" -c "import pytest" 2>/dev/null && [ -d .whl ]; then
        "$python" -m pip install -q --no-index --find-links .whl pytest
    fi
    "$python" -m pytest -q -p no:cacheprovider tests/test_train_fast_modes.py -k "$TESTS" > "$out/tests.txt" 2>&1
    tail -n 3 "$out/tests.txt"
fi

if [ ! -f "$work/InternVL2-2B/config.json" ]; then
    "$python" tools/make_tiny_model.py "$work/InternVL2-2B" --like InternVL2-2B --device cuda
fi
"$python" tools/benchmark_train.py --model "$work/InternVL2-2B" --device "${DEVICE:-cuda}" --faithful-batch 4 --batch "${BATCH:-4}" \
    --pictures "${PICTURES:-4}" --length-multiple "${LENGTH_MULTIPLE:-8}" \
    --pad-multiple "${PAD_MULTIPLE:-1}" --steps "${STEPS:-8}" --warmup "${WARMUP:-3}" --modes "$MODES" \
    --json "$out/benchmark_train.json" > "$out/benchmark_train.txt" 2>&1
grep -E "^\||^warning" "$out/benchmark_train.txt"
