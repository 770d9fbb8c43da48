#!/bin/sh
# One device call: the tutorial's launcher (finetune_check.sh: random full-size InternVL2-2B, COCO-shaped synthetic
# data, ZeRO-1, bf16, 8 loader workers) in the faithful and the two fast modes, each with a profile of steps PROFILE,
# then the table of all runs (tools/gpu/launcher_table.py).
#   sh tools/gpu/launcher_modes_check.sh OUT_DIR
#   RUNS="per_caption grouped" STEPS=24 PROFILE=20,22 LIMIT=240 sh tools/gpu/launcher_modes_check.sh OUT_DIR
# Environment: RUNS (any of faithful per_caption grouped), STEPS, PROFILE (FIRST,LAST, or none), LIMIT
# (seconds per run; a run stopped there keeps its logs), TAG (appended to each run's name), EXTRA (launcher flags
# added to every run, e.g. "--logging_steps 1"), PYTHON; the runs inherit
# the rest of the environment. Carry .whl (DeepSpeed and its needs). Leaves the table in
# OUT_DIR/launcher_table.md and every run's logs in OUT_DIR/launcher_logs.tar.gz, written again after each run (the
# device tool returns a few files only, and a command stopped at its limit returns what $OUT has by then).
set -u
out=${1:?usage: sh tools/gpu/launcher_modes_check.sh OUT_DIR}
python=${PYTHON:-python3}
# The device machine has no installed package: the checkout itself is importable.
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
RUNS=${RUNS:-faithful per_caption grouped}
STEPS=${STEPS:-20}
PROFILE=${PROFILE:-16,18}
LIMIT=${LIMIT:-240}
logs=${WORK:-/tmp/finetune_check}/launcher_logs
mkdir -p "$out" "$logs"
fast="--supervised_logits_only True --grad_checkpoint False --compile_blocks True"
states=""
for run in $RUNS; do
    case $run in
        faithful) flags="" ;;
        per_caption) flags="$fast" ;;
        grouped) flags="$fast --group_by_image True" ;;
        *) echo "unknown run $run (faithful, per_caption, grouped)" >&2; exit 2 ;;
    esac
    name=$run${TAG:-}
    profile_flags=""
    [ "$PROFILE" = none ] || profile_flags="--profile_steps $PROFILE"
    flags="$flags ${EXTRA:-}"
    echo "[launcher_modes_check] $name: $flags $profile_flags"
    # A process group of its own, so that a run past LIMIT is stopped with all its processes (torchrun, the
    # ranks, the loader workers): `timeout` would signal the shell only, which waits for its child first.
    # shellcheck disable=SC2086  # the flags are words
    GPUS=1 STEPS=$STEPS NAME=$name setsid sh tools/gpu/finetune_check.sh "$logs" $flags $profile_flags \
        > "$logs/${name}_stdout.txt" 2>&1 &
    pid=$!
    waited=0
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$LIMIT" ]; do
        sleep 2
        waited=$((waited + 2))
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "[launcher_modes_check] $name: stopped after ${LIMIT} s"
        kill -s TERM -- "-$pid"
        sleep 10
        kill -s KILL -- "-$pid" 2>/dev/null
    fi
    wait "$pid"
    rc=$?
    echo "[launcher_modes_check] $name exited with $rc"
    [ "$rc" -eq 0 ] || failed=1
    run_dir=${WORK:-/tmp/finetune_check}/run_$name  # finetune_check's run folder: the log so far, also when stopped
    [ -f "$logs/${name}_training_log.txt" ] || cp "$run_dir/training_log.txt" "$logs/${name}_training_log.txt" 2>/dev/null
    [ -f "$logs/${name}_trainer_state.json" ] && states="$states $logs/${name}_trainer_state.json"
    grep -o "'samples_per_second': '[0-9.]*'" "$logs/${name}_training_log.txt" 2>/dev/null | tail -n 3
    tar -czf "$out/launcher_logs${TAG:-}.tar.gz" -C "$(dirname "$logs")" launcher_logs
done
skip=""
[ "$PROFILE" = none ] || skip="--skip ${PROFILE%,*}-${PROFILE#*,}"
if [ -n "$states" ]; then
    # shellcheck disable=SC2086
    "$python" tools/gpu/launcher_table.py $states $skip | tee "$out/launcher_table${TAG:-}.md"
fi
for profile in "$logs"/*_profile_steps_*.txt; do
    if [ -f "$profile" ]; then
        echo "== $profile"
        sed -n '2p' "$profile"
        grep -A 6 "^GPU idle" "$profile"
    fi
done
exit "${failed:-0}"
