#!/usr/bin/env python3
"""Build a random InternVL checkpoint in the real format.

python tools/make_tiny_model.py pretrained/InternVL2-tiny                 # tiny InternLM2 model (demo, tests)
python tools/make_tiny_model.py OUT --llm qwen2 --vit 6b                  # other LLM / ViT families
python tools/make_tiny_model.py OUT --version 2.5                         # InternVL2.5 (InternLM2.5, internvl2_5)
python tools/make_tiny_model.py OUT --version 3                           # InternVL3 (Qwen2.5 and its tokenizer)
python tools/make_tiny_model.py OUT --version 3.5                         # InternVL3.5 (Qwen3 and its tokenizer)
python tools/make_tiny_model.py OUT --like InternVL2-2B --dtype bfloat16  # random weights at full size
"""

import argparse
import time
from pathlib import Path

import torch

from internvl_chat.checkpoint.presets import PRESETS
from internvl_chat.devkit.checkpoint import GENERATIONS, LLM_TYPES, VIT_TYPES, build_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder (created)")
    parser.add_argument(
        "--version",
        choices=sorted(GENERATIONS),
        default="2",
        help="InternVL generation of a tiny model: its template, config fields and tokenizer (default: %(default)s)",
    )
    parser.add_argument(
        "--llm",
        choices=sorted(LLM_TYPES),
        help="LLM family of a tiny model (default: the generation's 2B's: internlm2 for 2 and 2.5, qwen2 for 3, qwen3 "
        "for 3.5)",
    )
    parser.add_argument("--vit", choices=sorted(VIT_TYPES), default="300m", help="InternViT variant of a tiny model")
    parser.add_argument("--like", choices=sorted(PRESETS), help="random weights with this model's full shapes")
    parser.add_argument("--llm-hidden", type=int, default=128)
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--vit-hidden", type=int, default=64)
    parser.add_argument("--vit-layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=448, help="tile size of a tiny model (224: 4x cheaper)")
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="teach the tiny LLM to talk first (text-only next-token training; the demo uses 150)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="stored dtype (default: float32 for tiny models, bfloat16 with --like)",
    )
    parser.add_argument(
        "--device", default="cpu", help="where to initialise the weights (cuda is much faster for --like)"
    )
    parser.add_argument("--force", action="store_true", help="write into a folder that already has a checkpoint")
    args = parser.parse_args()

    families = GENERATIONS[args.version][0]
    args.llm = args.llm or families[0]
    if args.llm not in families:
        parser.error(f"InternVL{args.version} has no {args.llm} LLM; choose one of {', '.join(families)}")
    out = Path(args.out)
    if (out / "config.json").exists() and not args.force:
        parser.error(f"{out / 'config.json'} exists; pass --force to overwrite that checkpoint")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.like else "float32"))
    start = time.time()
    tiny_dims = (
        {}
        if args.like
        else dict(
            llm_hidden=args.llm_hidden,
            llm_layers=args.llm_layers,
            vit_hidden=args.vit_hidden,
            vit_layers=args.vit_layers,
            image_size=args.image_size,
        )
    )
    build_checkpoint(
        out,
        llm=args.llm,
        vit=args.vit,
        like=args.like,
        seed=args.seed,
        dtype=dtype,
        device=args.device,
        pretrain_steps=args.pretrain_steps,
        generation=args.version,
        **tiny_dims,
    )
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    what = args.like or f"tiny InternVL{args.version} ({args.llm} + InternViT-{args.vit})"
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"wrote {what} checkpoint ({dtype_name}) to {out}: {size:.1f} MiB in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
