#!/usr/bin/env python3
"""GPU check of the model family: a random full-size InternVL2 (bf16, default attention) is written in the real
format, loaded with our loader, and chats; prints and writes load time, generation speed and memory.

  python tools/gpu/check_model.py --like InternVL2-2B --out results/check_model.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from internvl_chat.checkpoint.loader import load_model, load_tokenizer
from internvl_chat.data.formats import CAPTION_PROMPT
from internvl_chat.devkit.checkpoint import build_checkpoint


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--like", default="InternVL2-2B")
    parser.add_argument("--tiles", type=int, default=7, help="tiles per image (7 = a 640x480 COCO image)")
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="print a torch profiler table of one chat")
    args = parser.parse_args()
    report = {"model": args.like, "device": torch.cuda.get_device_name(), "torch": torch.__version__}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.like
        _, report["build_s"] = timed(
            lambda: build_checkpoint(folder, like=args.like, dtype=torch.bfloat16, device="cuda")
        )
        report["checkpoint_gib"] = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model, report["load_s"] = timed(lambda: load_model(folder))
        tokenizer = load_tokenizer(folder)
    report["attn_implementation"] = model.config.llm_config._attn_implementation
    report["params"] = sum(p.numel() for p in model.parameters())
    report["weights_gib"] = torch.cuda.memory_allocated() / 2**30

    generator = torch.Generator(device="cuda").manual_seed(0)
    pixels = torch.randn(args.tiles, 3, 448, 448, device="cuda", generator=generator, dtype=torch.bfloat16)
    question = CAPTION_PROMPT
    fixed = dict(do_sample=False, num_beams=1)
    model.chat(tokenizer, pixels, question, dict(fixed, max_new_tokens=2))  # warm-up
    _, report["chat_1_token_s"] = timed(lambda: model.chat(tokenizer, pixels, question, dict(fixed, max_new_tokens=1)))
    full, report["chat_s"] = timed(
        lambda: model.chat(
            tokenizer, pixels, question, dict(fixed, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        )
    )
    report["prompt_tokens"] = args.tiles * model.num_image_token + 60
    report["decode_tokens_per_s"] = (args.new_tokens - 1) / (report["chat_s"] - report["chat_1_token_s"])
    report["sample_answer"] = full

    batch_pixels = pixels.repeat(args.batch, 1, 1, 1)
    answers, report["batch_chat_s"] = timed(
        lambda: model.batch_chat(
            tokenizer,
            batch_pixels,
            [question] * args.batch,
            dict(fixed, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens),
            num_patches_list=[args.tiles] * args.batch,
        )
    )
    report["batch_images_per_s"] = args.batch / report["batch_chat_s"]
    report["batch_equals_single"] = all(answer == full for answer in answers)
    report["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.chat(tokenizer, pixels, question, dict(fixed, max_new_tokens=10, min_new_tokens=10))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))

    for key, value in report.items():
        print(f"{key:24s} {value:.3f}" if isinstance(value, float) else f"{key:24s} {value}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
