#!/bin/sh
# The per-size tables of docs/PERFORMANCE.md on one GPU: caption evaluation (the fast engine against chat() batch 1,
# tools/benchmark_eval.py), the training modes (tools/benchmark_train.py) and the peak memory of LoRA fine-tuning per
# size, mode and per-device batch; then tools/gpu/sizes_table.py prints the three tables from the runs' JSON files.
#   sh tools/gpu/sizes_check.sh OUT_DIR                          # every part, one after another
#   PARTS=eval sh tools/gpu/sizes_check.sh OUT_DIR                # one part: eval, train or memory
#   PARTS=memory MEMORY_SIZES=InternVL2-4B,InternVL2-8B sh tools/gpu/sizes_check.sh OUT_DIR
# Environment: PARTS, EVAL_SIZES (size:images:batch, comma-separated), TRAIN_SIZES, MEMORY_SIZES, MEMORY_MODES,
# STEPS, WARMUP, WORK (the random checkpoints and the data, built once and reused), PYTHON. Each part writes its
# JSON and text files to OUT_DIR as it goes, so a run cut short keeps what it measured.
set -u
out=${1:?usage: sh tools/gpu/sizes_check.sh OUT_DIR}
# The device machine has no installed package: the checkout itself is importable.
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
work=${WORK:-/tmp/sizes_check}
parts=${PARTS:-eval,train,memory}
mkdir -p "$out" "$work"

model() {  # the random full-size checkpoint of a size, built once into $work
    if [ ! -f "$work/$1/config.json" ]; then
        "$python" tools/make_tiny_model.py "$work/$1" --like "$1" --device cuda > /dev/null
    fi
}

has() { case ",$parts," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if has eval; then
    for entry in $(echo "${EVAL_SIZES:-InternVL2-1B:5000:128,InternVL2-2B:2000:128,InternVL2-4B:1000:64,InternVL2-8B:1000:64}" | tr , ' '); do
        size=${entry%%:*}; rest=${entry#*:}; images=${rest%%:*}; batch=${rest#*:}
        model "$size"
        "$python" tools/benchmark_eval.py --like "$size" --work "$work" --images "$images" --baseline-images 20 \
            --batch-sizes "$batch" --json "$out/eval_$size.json" > "$out/eval_$size.txt" 2>&1
        grep -E "^\| (original|fast)" "$out/eval_$size.txt" | sed "s/^/$size /"
    done
fi

if has train; then
    for size in $(echo "${TRAIN_SIZES:-InternVL2-1B,InternVL2-4B}" | tr , ' '); do
        model "$size"
        "$python" tools/benchmark_train.py --model "$work/$size" --steps "${STEPS:-6}" --warmup "${WARMUP:-3}" \
            --json "$out/train_$size.json" > "$out/train_$size.txt" 2>&1
        grep -E "^\| (faithful|supervised|fast)|^warning|error" "$out/train_$size.txt" | sed "s/^/$size /"
    done
fi

if has memory; then
    # without compile_blocks: compiling every mode of every size would take most of the run
    modes=${MEMORY_MODES:-faithful,supervised_logits_only,supervised_logits_only+no_grad_checkpoint,supervised_logits_only+no_grad_checkpoint+group_by_image}
    for size in $(echo "${MEMORY_SIZES:-InternVL2-1B,InternVL2-2B,InternVL2-4B,InternVL2-8B}" | tr , ' '); do
        model "$size"
        for batch in 4 1; do  # the tutorial's per-device batch, and the smallest; 16 captions a step either way
            "$python" tools/benchmark_train.py --model "$work/$size" --batch "$batch" --accumulation $((16 / batch)) \
                --steps 1 --warmup 0 --modes "$modes" --json "$out/memory_${size}_batch$batch.json" \
                > "$out/memory_${size}_batch$batch.txt" 2>&1
            grep -E "^\{'mode'.*error" "$out/memory_${size}_batch$batch.txt"
        done
    done
fi

"$python" tools/gpu/sizes_table.py "$out" | tee "$out/tables.md"
