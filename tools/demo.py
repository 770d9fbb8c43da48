#!/usr/bin/env python3
"""The embedded default: the whole tutorial, on a tiny InternVL2 and a synthetic COCO, on any machine.

  sh tools/demo.sh            # sets up .venv, then runs this

Stages, each through the real scripts with environment overrides:
  1. build pretrained/InternVL2-tiny (real format, locally trained tokenizer and language) and a synthetic COCO
  2. GPUS=1 sh evaluate.sh pretrained/InternVL2-tiny caption-coco --dynamic             (before)
  3. GPUS=2 sh shell/internvl2.0/2nd_finetune/..._lora_coco.sh                           (LoRA r128, ZeRO-1)
  4. GPUS=1 sh evaluate.sh work_dirs/internvl_chat_v2_0/demo_lora_coco caption-coco --dynamic   (after, unmerged)
  5. python tools/merge_lora.py work_dirs/.../demo_lora_coco work_dirs/.../demo_lora_coco_merged
  6. AutoModel.from_pretrained(merged, trust_remote_code=True) + chat on a test picture
  7. python tools/caption_report.py BEFORE AFTER: demo_out/report/ holds the before/after table (metrics.md), its
     chart (metrics.png) and a page of the test pictures with their references and both runs' captions (index.html)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from internvl_chat.data.formats import ANNOTATIONS_FOLDER, KARPATHY_TEST_JSON

REPO = Path(__file__).resolve().parents[1]

LAUNCHER = "shell/internvl2.0/2nd_finetune/internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_lora_coco.sh"
MODEL = "pretrained/InternVL2-tiny"
RUN = "work_dirs/internvl_chat_v2_0/demo_lora_coco"
CHAT = """import sys, torch
from transformers import AutoModel, AutoTokenizer
from internvl_chat.data.transforms import load_image
from internvl_chat.data.formats import CAPTION_PROMPT
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
pixel_values = load_image(sys.argv[2], image_size=model.config.force_image_size, max_num=model.config.max_dynamic_patch)
answer = model.chat(tokenizer, pixel_values, CAPTION_PROMPT, dict(max_new_tokens=30, do_sample=False))
print("AutoModel caption:", answer)
"""


def stage(number: int, text: str) -> None:
    print(f"\n=== [{number}/7] {text} ===", flush=True)


def run(command: list[str], env: dict | None = None, shown: str | None = None) -> str:
    """Run a step with its output shown live (progress bars as their last state); stop the demo if it fails."""
    settings = " ".join(f"{key}={value}" for key, value in (env or {}).items())
    print(f"$ {settings + ' ' if settings else ''}{shown or ' '.join(command)}", flush=True)
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines = []
    for raw in process.stdout:  # bytes: a bar redrawn with \r stays one line, shown in its last state
        line = raw.decode(errors="replace").rstrip("\n").rsplit("\r", 1)[-1].strip("\r")
        lines.append(line + "\n")
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    if process.wait() != 0:
        sys.exit(f"demo: step failed (exit status {process.returncode}): {shown or ' '.join(command)}")
    return "".join(lines)


def latest_results(folder: Path) -> Path:
    return sorted(path for path in folder.glob("coco_*.json") if not path.name.endswith("_gt.json"))[-1]


def data_setup(args) -> tuple[Path, list[str]]:
    """The synthetic COCO goes to data/coco unless a real COCO is there; then to demo_out/data/coco."""
    from internvl_chat.devkit.coco import SCENES_JSON, make_synthetic_coco

    coco = REPO / "data/coco"
    root_args = []
    if coco.exists() and any(coco.iterdir()) and not (coco / SCENES_JSON).exists():
        root_args = ["--data-root", str(args.out)]
        coco = args.out / "data/coco"
        print(f"data/coco holds a real COCO: the synthetic one goes to {coco}")
    meta = args.out / "coco_caption.json"
    make_synthetic_coco(
        coco, train_images=args.train_images, test_images=args.test_images, seed=args.seed, force=True, meta_path=meta
    )
    print(
        f"synthetic COCO: {args.train_images} train pictures x 5 captions, {args.test_images} test pictures in {coco}"
    )
    return meta, root_args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "demo_out")
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--test-images", type=int, default=40)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--learning-rate", default="3e-3", help="the tiny model learns at a higher rate than 4e-5")
    parser.add_argument(
        "--max-dynamic-patch",
        default="2",
        help="most tiles per image in training and evaluation (the tutorial's 6 works too, 3-4x slower on a CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    # where the processes cache what they build: the repository's .cache/, not the home folder
    os.environ.setdefault("HF_MODULES_CACHE", str(REPO / ".cache/huggingface/modules"))
    os.environ.setdefault("MPLCONFIGDIR", str(REPO / ".cache/matplotlib"))

    stage(1, "build the tiny model and the synthetic COCO")
    if not (REPO / MODEL / "config.json").exists():
        run(
            [
                sys.executable,
                "tools/make_tiny_model.py",
                MODEL,
                "--image-size",
                "224",
                "--pretrain-steps",
                "150",
                "--seed",
                str(args.seed),
            ]
        )
    else:
        print(f"{MODEL} exists: using it")
    meta, root_args = data_setup(args)

    common = [
        "caption-coco",
        "--dynamic",
        "--max-dynamic-patch",
        args.max_dynamic_patch,
        "--batch-size",
        "8",
        *root_args,
    ]
    stage(2, "evaluate the tiny base model")
    shutil.rmtree(args.out / "results_before", ignore_errors=True)
    run(["sh", "evaluate.sh", MODEL, *common, "--out-dir", str(args.out / "results_before")], env={"GPUS": "1"})

    stage(3, "LoRA fine-tuning with the tutorial's launcher")
    shutil.rmtree(REPO / RUN, ignore_errors=True)  # a fresh run, not a resume of an earlier demo
    env = {
        "GPUS": "2",
        "BATCH_SIZE": "16",
        "PER_DEVICE_BATCH_SIZE": "4",
        "MODEL": MODEL,
        "META_PATH": str(meta),
        "OUTPUT_DIR": RUN,
    }
    run(
        [
            "sh",
            LAUNCHER,
            "--force_image_size",
            "224",
            "--max_dynamic_patch",
            args.max_dynamic_patch,
            "--num_train_epochs",
            str(args.epochs),
            "--learning_rate",
            args.learning_rate,
            "--dataloader_num_workers",
            "1",
            "--save_steps",
            "50",
            "--logging_steps",
            "10",
        ],
        env=env,
    )

    stage(4, "evaluate the LoRA output (unmerged)")
    shutil.rmtree(args.out / "results_after", ignore_errors=True)
    run(["sh", "evaluate.sh", RUN, *common, "--out-dir", str(args.out / "results_after")], env={"GPUS": "1"})

    stage(5, "merge the adapter")
    run([sys.executable, "tools/merge_lora.py", RUN, RUN + "_merged", "--force"])

    stage(6, "load the merged model with AutoModel and chat")
    data_root = Path(root_args[1]) if root_args else REPO
    first = json.loads((data_root / "data/coco" / ANNOTATIONS_FOLDER / KARPATHY_TEST_JSON).read_text())[0]
    picture = data_root / "data/coco" / first["image"]
    output = run(
        [sys.executable, "-c", CHAT, RUN + "_merged", str(picture)],
        env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        shown=f"python -c '<AutoModel.from_pretrained, chat>' {RUN}_merged {picture.name}",
    )
    answer = output.split("AutoModel caption:")[-1].strip()
    print(f"references: {' | '.join(first['caption'][:2])}")

    stage(7, "the report of both evaluations")
    before, after = latest_results(args.out / "results_before"), latest_results(args.out / "results_after")
    run(
        [
            sys.executable,
            "tools/caption_report.py",
            str(before),
            str(after),
            "--names",
            "before,after",
            "--out",
            str(args.out / "report"),
            *root_args,
        ]
    )
    metrics = {
        name: json.loads(latest_summary.read_text().splitlines()[-1])[3]
        for name, latest_summary in (
            ("before", sorted((args.out / "results_before").glob("*.txt"))[-1]),
            ("after", sorted((args.out / "results_after").glob("*.txt"))[-1]),
        )
    }
    gain = metrics["after"]["CIDEr"] - metrics["before"]["CIDEr"]
    print(f"AutoModel caption of {picture.name}: {answer}")
    print(
        f"CIDEr {metrics['before']['CIDEr']:.3f} -> {metrics['after']['CIDEr']:.3f} ({gain:+.3f}) in "
        f"{time.time() - start:.0f} s; open {args.out / 'report/index.html'}"
    )
    if gain <= 0:
        sys.exit("demo: fine-tuning did not raise CIDEr")


if __name__ == "__main__":
    main()
