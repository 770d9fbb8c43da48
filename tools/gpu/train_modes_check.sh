#!/bin/sh
# One device call for the training modes: the CUDA-only tests (flex attention and the prefix split against SDPA,
# eager and compiled), then tools/benchmark_train.py's table on a random full-size InternVL2-2B built once.
#   sh tools/gpu/train_modes_check.sh OUT_DIR                       # faithful, fast, fast_grouped
#   MODES=faithful,fast STEPS=12 TESTS=none sh tools/gpu/train_modes_check.sh OUT_DIR
# Environment: MODES, STEPS, WARMUP, BATCH, ACCUMULATION, EXTRA (more benchmark_train flags, e.g. --coco-sizes),
# TESTS (the tests' -k expression, or none), WORK, PYTHON. Pytest is installed from .whl/ when the machine lacks it
# (carry .whl). Leaves OUT_DIR/tests.txt, OUT_DIR/benchmark_train.txt and OUT_DIR/benchmark_train.json.
set -u
out=${1:?usage: sh tools/gpu/train_modes_check.sh OUT_DIR}
# The device machine has no installed package: the checkout itself is importable.
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
work=${WORK:-/tmp/train_modes_check}
mkdir -p "$out" "$work"

TESTS=${TESTS:-cuda}
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
# shellcheck disable=SC2086  # EXTRA is a list of words
"$python" tools/benchmark_train.py --model "$work/InternVL2-2B" --device cuda --batch "${BATCH:-4}" \
    --accumulation "${ACCUMULATION:-4}" --steps "${STEPS:-8}" --warmup "${WARMUP:-3}" --modes "${MODES:-faithful,fast,fast_grouped}" \
    --json "$out/benchmark_train.json" ${EXTRA:-} > "$out/benchmark_train.txt" 2>&1
grep -E "^\||^warning|^\{'mode'.*error" "$out/benchmark_train.txt"
