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
  7. demo_out/: the before/after table (report.md), a chart (report.png) and a page of pictures with their
     reference, before and after captions (index.html)
"""

import argparse
import html
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from internvl_chat.data.validate import image_id_from_name  # noqa: E402
from internvl_chat.eval.scoring import METRIC_NAMES  # noqa: E402

METRICS = METRIC_NAMES
LAUNCHER = "shell/internvl2.0/2nd_finetune/internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_lora_coco.sh"
MODEL = "pretrained/InternVL2-tiny"
RUN = "work_dirs/internvl_chat_v2_0/demo_lora_coco"


def free_port() -> int:
    """A port the OS reports free, so that the demo's torchrun does not collide with another run on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stage(number: int, text: str) -> None:
    print(f"\n=== [{number}/7] {text} ===", flush=True)


def run(command: list[str], env: dict | None = None, log: Path | None = None) -> str:
    """Run a step, show its output live, stop the demo if it fails."""
    print(
        "$ " + " ".join(f"{k}={v}" for k, v in (env or {}).items()) + (" " if env else "") + " ".join(command),
        flush=True,
    )
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if not line.startswith(("Loading weights", "Writing model shards")):
            sys.stdout.write(line)
    if process.wait() != 0:
        if log:
            log.write_text("".join(lines))
        sys.exit(f"demo: step failed (exit {process.returncode}): {' '.join(command)}")
    return "".join(lines)


def last_metrics(out_dir: Path) -> tuple[dict, list]:
    summary = sorted(out_dir.glob("*.txt"))[-1]
    _, _, _, metrics = json.loads(summary.read_text().splitlines()[-1])
    results = json.loads(sorted(out_dir.glob("coco_*.json"))[-1].read_text())
    return metrics, results


def data_setup(args) -> tuple[Path, list[str]]:
    """The synthetic COCO goes to data/coco unless a real COCO is there; then to demo_out/data/coco."""
    from internvl_chat.synthetic.coco import SCENES_JSON, make_synthetic_coco

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


def chat_with_automodel(merged: Path, image: Path) -> str:
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "sys.path.insert(0, '.')\n"
        "from internvl_chat.data.transforms import load_image\n"
        "from internvl_chat.eval.caption_data import CAPTION_PROMPT\n"
        "path = sys.argv[1]\n"
        "model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()\n"
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n"
        "pixel_values = load_image(sys.argv[2], image_size=model.config.force_image_size,\n"
        "                          max_num=model.config.max_dynamic_patch)\n"
        "answer = model.chat(tokenizer, pixel_values, CAPTION_PROMPT,\n"
        "                    dict(max_new_tokens=30, do_sample=False))\n"
        "print('AutoModel caption:', answer)\n"
    )
    output = run([sys.executable, "-c", script, str(merged), str(image)], env={"HF_HUB_OFFLINE": "1"})
    return output.split("AutoModel caption:")[-1].strip()


def write_report(args, before, after, before_results, after_results, test_entries, chat_answer, elapsed):
    out = args.out
    rows = [
        f"| {name} | {before[name]:.3f} | {after[name]:.3f} | {after[name] - before[name]:+.3f} |" for name in METRICS
    ]
    table = "\n".join(["| metric | before | after LoRA | change |", "|---|---|---|---|", *rows])
    print("\n" + table + "\n")
    state = json.loads((REPO / RUN / "trainer_state.json").read_text())
    losses = [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, curve) = plt.subplots(1, 2, figsize=(12, 4.2))
    positions = range(len(METRICS))
    bars.bar([p - 0.2 for p in positions], [before[m] for m in METRICS], 0.4, label="before (tiny base model)")
    bars.bar([p + 0.2 for p in positions], [after[m] for m in METRICS], 0.4, label="after LoRA fine-tuning")
    bars.set_xticks(list(positions), METRICS, rotation=30)
    bars.set_title("COCO caption metrics on the synthetic test set")
    bars.legend()
    curve.plot([step for step, _ in losses], [loss for _, loss in losses])
    curve.set_xlabel("optimizer step")
    curve.set_ylabel("training loss")
    curve.set_title("LoRA r128 fine-tuning (lora_coco launcher)")
    figure.tight_layout()
    figure.savefig(out / "report.png", dpi=110)

    (out / "report.md").write_text(
        f"# Demo: InternVL2 LoRA fine-tuning on a synthetic COCO\n\n{table}\n\n"
        f"Training: {len(losses)} steps, loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}. "
        f'AutoModel caption of the first test picture: "{chat_answer}". Whole demo: {elapsed:.0f} s.\n\n'
        f"![before/after](report.png)\n"
    )

    before_by_id = {r["image_id"]: r["caption"] for r in before_results}
    after_by_id = {r["image_id"]: r["caption"] for r in after_results}
    cards = []
    for entry in test_entries[: args.html_images]:
        image_id = image_id_from_name(entry["image"])
        image = Path(entry["image_path"])
        target = out / "images" / image.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(image, target)
        references = "".join(f"<li>{html.escape(c)}</li>" for c in entry["caption"])
        cards.append(
            f"<div class=card><img src='images/{image.name}'><p><b>before:</b> "
            f"{html.escape(before_by_id[image_id])}</p><p><b>after:</b> {html.escape(after_by_id[image_id])}</p>"
            f"<details><summary>references</summary><ul>{references}</ul></details></div>"
        )
    style = (
        "body{font-family:sans-serif;margin:2em} .card{display:inline-block;width:300px;vertical-align:top;"
        "margin:8px;padding:8px;border:1px solid #ccc} .card img{width:100%} table{border-collapse:collapse}"
        " td,th{border:1px solid #ccc;padding:4px 8px}"
    )
    table_html = (
        "<table><tr><th>metric</th><th>before</th><th>after LoRA</th></tr>"
        + "".join(f"<tr><td>{m}</td><td>{before[m]:.3f}</td><td>{after[m]:.3f}</td></tr>" for m in METRICS)
        + "</table>"
    )
    (out / "index.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>InternVL2 demo</title><style>{style}</style>"
        f"<h1>InternVL2 LoRA fine-tuning on a synthetic COCO</h1>{table_html}<p><img src='report.png' "
        f"width=900></p><h2>Test pictures</h2>{''.join(cards)}"
    )
    print(f"report: {out / 'report.md'}, {out / 'report.png'}, {out / 'index.html'}")


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
    parser.add_argument("--html-images", type=int, default=12)
    args = parser.parse_args()
    start = time.time()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

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

    evaluation = ["sh", "evaluate.sh"]
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
    run(evaluation + [MODEL, *common, "--out-dir", str(args.out / "results_before")], env={"GPUS": "1"})
    before, before_results = last_metrics(args.out / "results_before")

    stage(3, "LoRA fine-tuning with the tutorial's launcher")
    shutil.rmtree(REPO / RUN, ignore_errors=True)  # a fresh run, not a resume of an earlier demo
    env = {
        "GPUS": "2",
        "BATCH_SIZE": "16",
        "PER_DEVICE_BATCH_SIZE": "4",
        "MODEL": MODEL,
        "META_PATH": str(meta),
        "OUTPUT_DIR": RUN,
        "MASTER_PORT": str(free_port()),
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
        ],
        env=env,
    )

    stage(4, "evaluate the LoRA output (unmerged)")
    shutil.rmtree(args.out / "results_after", ignore_errors=True)
    run(evaluation + [RUN, *common, "--out-dir", str(args.out / "results_after")], env={"GPUS": "1"})
    after, after_results = last_metrics(args.out / "results_after")

    stage(5, "merge the adapter")
    run([sys.executable, "tools/merge_lora.py", RUN, RUN + "_merged", "--force"])

    stage(6, "load the merged model with AutoModel and chat")
    data_root = Path(root_args[1]) if root_args else REPO
    test_entries = json.loads((data_root / "data/coco/annotations/coco_karpathy_test.json").read_text())
    for entry in test_entries:
        entry["image_path"] = str(data_root / "data/coco" / entry["image"])
    answer = chat_with_automodel(REPO / (RUN + "_merged"), Path(test_entries[0]["image_path"]))

    stage(7, "report")
    write_report(args, before, after, before_results, after_results, test_entries, answer, time.time() - start)
    gain = after["CIDEr"] - before["CIDEr"]
    print(f"CIDEr {before['CIDEr']:.3f} -> {after['CIDEr']:.3f} ({gain:+.3f}) in {time.time() - start:.0f} s")
    if gain <= 0:
        sys.exit("demo: fine-tuning did not raise CIDEr")


if __name__ == "__main__":
    main()
