#!/usr/bin/env python3
"""Where one evaluation batch's GPU time goes: torch.profiler over the fast engine's ViT pass and prefill.

  python tools/gpu/profile_eval_batch.py --work /tmp/w --like InternVL2-2B --batch 128

A random full-size model (built under --work if missing) and random 7-tile pixel batches: one warm-up batch, then
the ViT and the prefill of one batch are profiled separately. Prints each part's wall time and its kernels
grouped by name.
"""

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from internvl_chat.checkpoint.loader import load_model, load_tokenizer
from internvl_chat.data.formats import CAPTION_PROMPT
from internvl_chat.devkit.checkpoint import build_checkpoint
from internvl_chat.eval.fast_captioner import FastCaptioner, fast_engine_attention


def profiled(label, function, top):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        result = function()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e3
    print(f"\n== {label}: {wall * 1e3:.1f} ms wall, {busy:.1f} ms of kernels")
    for event in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        print(f"{event.self_device_time_total / 1e3:9.2f} ms {event.count:6d} x  {event.key[:110]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--like", default="InternVL2-2B")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    model_dir = Path(args.work) / args.like
    if not (model_dir / "config.json").exists():
        build_checkpoint(model_dir, like=args.like, dtype=torch.bfloat16, device="cuda")
    model = load_model(model_dir, attn_implementation=fast_engine_attention(None))
    tokenizer = load_tokenizer(model_dir)
    captioner = FastCaptioner(model, tokenizer, CAPTION_PROMPT)
    tiles = 7
    size = model.config.vision_config.image_size
    pixels = torch.randn(args.batch * tiles, 3, size, size, device="cuda", dtype=torch.bfloat16)
    captioner.caption(pixels, [tiles] * args.batch)  # warm-up: lazy inits, the decoding graph

    with torch.inference_mode():
        ids = captioner.prompt_ids(tiles).cuda().expand(args.batch, -1)
        features = profiled("ViT + projector", lambda: model.extract_feature(pixels), args.top)
        embeds, _ = model.embed_with_images(ids, features, strict=True)
        state = captioner.decode_state(args.batch, ids.shape[1], embeds.dtype, pixels.device)
        profiled("prefill", lambda: captioner.prefill(embeds, state), args.top)


if __name__ == "__main__":
    main()
