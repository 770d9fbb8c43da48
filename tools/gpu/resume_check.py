#!/usr/bin/env python3
"""Does a resumed run follow the uninterrupted one on a GPU? Two uninterrupted launcher runs of the same command
(their difference is the GPU's run-to-run spread) and a third resumed from a copy of the first one's mid-run
checkpoint (what a run killed after that checkpoint leaves on disk); prints each run's losses after the checkpoint
and the largest differences. On the CPU the resumed run is bit-identical (tests/test_train_launcher.py); on a GPU
kernels are not bit-deterministic, so the resumed run should differ from the first by about as much as the second.

  python3 tools/gpu/resume_check.py --out OUT            # the tiny model, 1 GPU, 40 steps, checkpoint at 20
  python3 tools/gpu/resume_check.py --out OUT -- --group_by_image True --supervised_logits_only True

Needs DeepSpeed on the machine (the launcher's ZeRO-1). Leaves OUT/resume_check.json and the runs' logs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "shell/internvl2.0/2nd_finetune/internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_lora_coco.sh"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/resume_check"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint", type=int, default=20, help="the step the third run resumes from")
    parser.add_argument("extra", nargs="*", help="more launcher flags, after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work
    model = work / "InternVL2-tiny"
    if not (model / "config.json").exists():
        subprocess.run(
            [sys.executable, "tools/make_tiny_model.py", str(model), "--image-size", "224", "--device", "cuda"],
            cwd=REPO,
            check=True,
        )
    if not (work / "meta.json").exists():
        subprocess.run(
            [sys.executable, "tools/make_synthetic_coco.py", "--out", str(work / "coco"), "--train-images", "200"]
            + ["--test-images", "4", "--meta", str(work / "meta.json")],
            cwd=REPO,
            check=True,
        )

    def launch(name: str) -> list[float]:
        env = dict(
            {key: value for key, value in os.environ.items() if key != "MASTER_PORT"},
            GPUS="1",
            BATCH_SIZE="16",
            PER_DEVICE_BATCH_SIZE="4",
            MODEL=str(model),
            META_PATH=str(work / "meta.json"),
            OUTPUT_DIR=str(work / name),
        )
        command = ["sh", str(LAUNCHER), "--force_image_size", "224", "--max_dynamic_patch", "2"]
        command += ["--max_steps", str(args.steps), "--save_steps", str(args.checkpoint), "--logging_steps", "1"]
        command += ["--learning_rate", "3e-3", "--save_total_limit", "2", *args.extra]  # keep the mid-run checkpoint
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        shutil.copy(work / name / "training_log.txt", args.out / f"{name}_training_log.txt")
        if result.returncode != 0:
            sys.exit(f"resume_check: run {name} failed; its log is {args.out / f'{name}_training_log.txt'}")
        history = json.loads((work / name / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    for name in ("first", "second", "resumed"):
        shutil.rmtree(work / name, ignore_errors=True)
    first = launch("first")
    second = launch("second")
    checkpoint = work / "first" / f"checkpoint-{args.checkpoint}"
    shutil.copytree(checkpoint, work / "resumed" / checkpoint.name)
    resumed = launch("resumed")
    after = slice(args.checkpoint, None)
    spread = max(abs(a - b) for a, b in zip(first[after], second[after]))
    gap = max(abs(a - b) for a, b in zip(first[after], resumed[after]))
    report = {
        "steps": args.steps,
        "checkpoint": args.checkpoint,
        "extra": args.extra,
        "losses": {"first": first, "second": second, "resumed": resumed},
        "largest_loss_difference_second_vs_first": spread,
        "largest_loss_difference_resumed_vs_first": gap,
    }
    (args.out / "resume_check.json").write_text(json.dumps(report, indent=1))
    print(f"steps {args.checkpoint + 1}-{args.steps}, loss of each run:")
    print("| step | first | second | resumed |\n|---|---|---|---|")
    for step in range(args.checkpoint, args.steps):
        print(f"| {step + 1} | {first[step]:.4f} | {second[step]:.4f} | {resumed[step]:.4f} |")
    print(
        f"largest loss difference after step {args.checkpoint}: second vs first {spread:.4f}, "
        f"resumed vs first {gap:.4f}"
    )


if __name__ == "__main__":
    main()
