#!/usr/bin/env python3
"""Does the grouped mode train as good a model as the tutorial's path? The demo's setting (the tiny model, the
synthetic COCO, 2 processes on the CPU, BATCH_SIZE 16, PER_DEVICE_BATCH_SIZE 4, 3 epochs, learning rate 3e-3),
trained per caption (the faithful path) and grouped by image, each with several seeds, each run evaluated; prints
CIDEr per run and the mean and spread of each mode.

  python tools/ab_grouped.py                      # seeds 42, 43, 44: about 20 minutes on 2 CPU cores
  python tools/ab_grouped.py --seeds 42,43,44,45,46 --out ab_out

Both modes take the same captions per step and the same steps per epoch (printed), through the real launcher and
evaluate.sh. The grouped runs add --group_by_image True --supervised_logits_only True (the supervised-logits loss is
the same loss, and cheaper on a CPU).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAUNCHER = "shell/internvl2.0/2nd_finetune/internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_lora_coco.sh"
MODES = {"faithful": [], "grouped": ["--group_by_image", "True", "--supervised_logits_only", "True"]}


def run(command: list[str], env: dict, log: Path) -> str:
    result = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"ab_grouped: {' '.join(command[:3])} failed (exit status {result.returncode}); its log: {log}")
    return result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="42,43,44", help="training seeds, comma-separated (the data stay the same)")
    parser.add_argument("--out", type=Path, default=REPO / "ab_out")
    parser.add_argument("--model", default="pretrained/InternVL2-tiny", help="built as the demo builds it if missing")
    parser.add_argument("--epochs", default="3")
    parser.add_argument("--learning-rate", default="3e-3")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from internvl_chat.devkit.coco import make_synthetic_coco

    if not (REPO / args.model / "config.json").exists():
        run(
            [sys.executable, "tools/make_tiny_model.py", args.model, "--image-size", "224", "--pretrain-steps", "150"],
            {},
            out / "make_tiny_model.log",
        )
    make_synthetic_coco(
        out / "data/coco", train_images=200, test_images=40, seed=0, force=True, meta_path=out / "meta.json"
    )
    rows = []
    for mode, flags in MODES.items():
        for seed in args.seeds.split(","):
            name = f"{mode}_seed{seed}"
            env = {
                "GPUS": "2",
                "BATCH_SIZE": "16",
                "PER_DEVICE_BATCH_SIZE": "4",
                "MODEL": args.model,
                "META_PATH": str(out / "meta.json"),
                "OUTPUT_DIR": str(out / name),
            }
            subprocess.run(["rm", "-rf", str(out / name)], check=True)
            log = run(
                [
                    "sh",
                    LAUNCHER,
                    "--force_image_size",
                    "224",
                    "--max_dynamic_patch",
                    "2",
                    "--num_train_epochs",
                    args.epochs,
                    "--learning_rate",
                    args.learning_rate,
                    "--dataloader_num_workers",
                    "1",
                    "--save_strategy",
                    "no",
                    "--logging_steps",
                    "10",
                    "--seed",
                    seed,
                    *flags,
                ],
                env,
                out / f"{name}_training.log",
            )
            steps = re.search(r"Total optimization steps = ([\d,]+)", log).group(1)
            step_line = re.search(r"Steps: (.*)", log).group(1)
            results = out / f"{name}_results"
            subprocess.run(["rm", "-rf", str(results)], check=True)
            run(
                [
                    "sh",
                    "evaluate.sh",
                    str(out / name),
                    "caption-coco",
                    "--dynamic",
                    "--max-dynamic-patch",
                    "2",
                    "--batch-size",
                    "8",
                    "--data-root",
                    str(out),
                    "--out-dir",
                    str(results),
                ],
                {"GPUS": "1"},
                out / f"{name}_evaluation.log",
            )
            summary = next(results.glob("*.txt"))
            metrics = json.loads(summary.read_text().splitlines()[-1])[3]
            rows.append({"mode": mode, "seed": seed, "steps": steps, "step_line": step_line, **metrics})
            print(f"{name}: {steps} steps, CIDEr {metrics['CIDEr']:.3f} ({step_line})", flush=True)
    (out / "ab_grouped.json").write_text(json.dumps(rows, indent=1))
    print("\n| mode | optimizer steps | CIDEr of each seed | CIDEr mean | spread (standard deviation) | BLEU-4 mean |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        mine = [row for row in rows if row["mode"] == mode]
        ciders = [row["CIDEr"] for row in mine]
        spread = statistics.stdev(ciders) if len(ciders) > 1 else 0.0
        print(
            f"| {mode} | {mine[0]['steps']} | {', '.join(f'{value:.3f}' for value in ciders)} | "
            f"{statistics.mean(ciders):.3f} | {spread:.3f} | {statistics.mean(row['Bleu_4'] for row in mine):.3f} |"
        )


if __name__ == "__main__":
    main()
