#!/usr/bin/env python3
"""Caption-evaluation speed: the original's path (chat() one image at a time) versus the fast engine, on a random
full-size InternVL2 and COCO-shaped synthetic images (640x480 -> 7 tiles), measured in the same run.

  python tools/benchmark_eval.py --like InternVL2-2B --images 5000 --baseline-images 100 --batch-sizes 64,128

A batch size may carry +nographs: decoding steps launched from Python instead of replayed as a CUDA graph (the
evaluation's --no-cuda-graphs).

Prints a table (images/s, prefill tokens/s, model TFLOP/s, MFU, peak memory) and writes --json. Captions of the
random model never end early, so every image gets the full 30 new tokens (the slowest case).
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from internvl_chat.checkpoint.loader import load_model, load_tokenizer
from internvl_chat.data.formats import ANNOTATIONS_FOLDER, KARPATHY_TEST_JSON
from internvl_chat.devkit.checkpoint import build_checkpoint
from internvl_chat.devkit.coco import make_synthetic_coco
from internvl_chat.eval.caption_data import CaptionImages
from internvl_chat.eval.caption_sets import CAPTION_SETS, read_entries
from internvl_chat.eval.captioner import EngineChoice, build_captioner
from internvl_chat.eval.fast_captioner import fast_engine_attention
from internvl_chat.eval.generation import generate_captions
from internvl_chat.train.flops import FlopModel, peak_tflops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--like", default="InternVL2-2B")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--baseline-images", type=int, default=100, help="images for the slow batch-1 path")
    parser.add_argument(
        "--batch-sizes",
        default="64,128",
        help="fast-engine runs to measure: batch sizes, each optionally +nographs and/or +nokernels",
    )
    parser.add_argument("--num-workers", type=int, default=8)
    parser.add_argument("--work", default=None, help="folder for the model and data (default: a temp folder)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="time the fast engine's phases (adds syncs)")
    args = parser.parse_args()
    device = torch.device("cuda")
    work = Path(args.work or tempfile.mkdtemp(prefix="benchmark_eval_"))
    model_dir = work / args.like
    if not (model_dir / "config.json").exists():
        build_checkpoint(model_dir, like=args.like, dtype=torch.bfloat16, device="cuda")
    if not (work / "data/coco" / ANNOTATIONS_FOLDER / KARPATHY_TEST_JSON).exists():
        make_synthetic_coco(work / "data/coco", train_images=1, test_images=args.images, seed=0, image_size=(640, 480))
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)  # the original's path first: chat() under the default attention
    entries, _ = read_entries(CAPTION_SETS["coco"], str(work))
    if len(entries) < args.images:
        parser.error(f"{work / 'data/coco'} has {len(entries)} test pictures, fewer than --images {args.images}")
    entries = entries[: args.images]  # a --work folder shared by several runs keeps the first run's pictures
    caption_set = CAPTION_SETS["coco"]
    flop_model = FlopModel.from_config(model.config)
    tiles, prompt_tokens = 7, 7 * model.num_image_token + 60
    flops_per_image = (
        flop_model.vision_flops(tiles)
        + flop_model.llm_flops([prompt_tokens], 1, backward=False)
        + caption_set.max_new_tokens
        * 2
        * (flop_model.llm_matmul_params + model.config.llm_config.hidden_size * model.config.llm_config.vocab_size)
    )
    peak = peak_tflops(torch.cuda.get_device_name())

    def measure(label, engine, batch_size, subset, flags=()):
        captioner = build_captioner(
            EngineChoice(engine, batch_size, num_beams=1),
            model,
            tokenizer,
            caption_set.max_new_tokens,
            caption_set.min_new_tokens,
            cuda_graphs="nographs" not in flags,
            profile=args.profile,
        )
        dataset = CaptionImages.for_model(subset, model.config, dynamic=True, max_dynamic_patch=6)
        torch.cuda.reset_peak_memory_stats()
        ids, captions, seconds, waited = generate_captions(
            dataset,
            captioner,
            list(range(len(subset))),
            device,
            next(model.parameters()).dtype,
            num_workers=args.num_workers,
        )
        if engine == "fast" and captioner.timer.enabled:
            print("fast engine phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in captioner.timer.seconds.items()))
        rate = len(ids) / seconds
        row = {
            "path": label,
            "engine": engine,
            "batch": batch_size,
            "images": len(ids),
            "seconds": round(seconds, 1),
            "images_per_s": round(rate, 2),
            "prefill_tokens_per_s": round(rate * prompt_tokens),
            "tflops": round(rate * flops_per_image / 1e12, 1),
            "mfu": round(rate * flops_per_image / 1e12 / peak, 3) if peak else None,
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
            "data_wait_s": round(waited, 1),
        }
        print(row, flush=True)
        return row, captions

    def save(rows):  # after every row: a run cut short keeps what it measured
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "device": torch.cuda.get_device_name(),
                        "model": args.like,
                        "flops_per_image": flops_per_image,
                        "rows": rows,
                    },
                    indent=1,
                )
            )

    runs = [run.split("+") for run in args.batch_sizes.split(",")]
    for batch_size, *flags in runs:
        if set(flags) - {"nographs"} or not batch_size.isdigit():
            parser.error(f"--batch-sizes: {'+'.join([batch_size, *flags])} is not N or N+nographs")
    rows = []
    measure("warm-up", "hf", 1, entries[:2])
    baseline, baseline_captions = measure("original: chat(), batch 1", "hf", 1, entries[: args.baseline_images])
    rows.append(baseline)
    save(rows)
    del model
    torch.cuda.empty_cache()
    model = load_model(model_dir, attn_implementation=fast_engine_attention(None))  # as the evaluation loads it
    measure("warm-up", "fast", 8, entries[:8])
    for batch_size, *flags in runs:
        label = f"fast engine, batch {batch_size}" + "".join(f", {flag}" for flag in flags)
        try:
            row, captions = measure(label, "fast", int(batch_size), entries, flags)
        except Exception as error:  # e.g. out of memory: report it, keep the other rows
            print(f"{label}: {type(error).__name__}: {error}", flush=True)
            continue
        row["speedup"] = round(row["images_per_s"] / baseline["images_per_s"], 1)
        row["same_captions_as_batch_1_on_its_images"] = sum(a == b for a, b in zip(captions, baseline_captions)) / len(
            baseline_captions
        )
        rows.append(row)
        save(rows)

    print(
        f"\n{torch.cuda.get_device_name()}, {args.like} (random weights, bf16), {prompt_tokens} prompt tokens, "
        f"{flops_per_image / 1e12:.1f} TFLOP per image"
    )
    print("| path | images | s | images/s | prefill tokens/s | TFLOP/s | MFU | peak GB | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['path']} | {row['images']} | {row['seconds']} | {row['images_per_s']} | "
            f"{row['prefill_tokens_per_s']:,} | {row['tflops']} | {row['mfu']} | {row['peak_memory_gb']} | "
            f"{row.get('speedup', 1.0)} |"
        )


if __name__ == "__main__":
    main()
