#!/usr/bin/env python3
"""How fast the training data pipeline turns COCO-shaped lines into batches, per loader worker (CPU only).

  python tools/benchmark_loader.py                        # synthetic 640x480 COCO, the tiny tokenizer
  python tools/benchmark_loader.py --tokenizer pretrained/InternVL2-2B --pictures 200

Each row reads batches in this process, as one loader worker does (open the JPEG, tile it to 6 + 1 thumbnail tiles
of 448 px, normalise, tokenize, and the trainer's collator with --bf16: pad or group, count, find the loss rows,
cast the pixels) and prints captions/s. A GPU step does not wait for its loader while workers x captions/s here
exceed the training rate. Rows: per caption (batches of --batch random captions, the fast per-caption mode's
collator) and grouped by image (micro-batches of whole pictures with 4 x --batch captions, as the trainer makes
them on one GPU with BATCH_SIZE 16; each picture loaded once).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from internvl_chat.checkpoint.loader import load_tokenizer
from internvl_chat.data.dataset import ImageGroupedDataset, build_datasets
from internvl_chat.data.preprocess import ConversationTokenizer
from internvl_chat.devkit.checkpoint import tokenizer_corpus
from internvl_chat.devkit.coco import make_synthetic_coco
from internvl_chat.devkit.tokenizer import build_tiny_tokenizer
from internvl_chat.train.batch_layout import BatchLayout
from internvl_chat.train.step_shape import decide_step_shape

NUM_IMAGE_TOKEN = 256  # InternVL2's tokens per 448 px tile


def captions_per_second(loader, batches: int) -> tuple[float, int]:
    captions, start = 0, time.perf_counter()
    for number, batch in enumerate(loader):
        if number == batches:
            break
        captions += batch.counts.captions
    return captions / (time.perf_counter() - start), captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="a checkpoint folder whose tokenizer to use (default: the repository's tiny tokenizer)",
    )
    parser.add_argument("--pictures", type=int, default=40, help="synthetic training pictures (5 captions each)")
    parser.add_argument("--batch", type=int, default=4, help="captions per per-caption batch")
    parser.add_argument("--batches", type=int, default=10, help="batches timed per row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.tokenizer:
            tokenizer, tokenizer_name = load_tokenizer(args.tokenizer), args.tokenizer
        else:
            tokenizer, tokenizer_name = build_tiny_tokenizer(work / "tokenizer", tokenizer_corpus()), "tiny"
        make_synthetic_coco(
            work / "coco",
            train_images=args.pictures,
            test_images=1,
            seed=0,
            image_size=(640, 480),
            meta_path=work / "meta.json",
        )
        encoder = ConversationTokenizer(tokenizer, "internlm2-chat", NUM_IMAGE_TOKEN, 4096)
        dataset = build_datasets(work / "meta.json", encoder, image_size=448, max_dynamic_patch=6)
        per_caption = BatchLayout(supervised_logits_only=True)
        # grouped: the micro-batches of whole pictures the trainer makes of 4 x --batch captions (one GPU, BATCH 16)
        grouped = BatchLayout(
            supervised_logits_only=True,
            group_by_image=True,
            step=decide_step_shape(args.batch, 1, True, accumulation=4),
        )
        rows = [
            (
                "per caption",
                DataLoader(
                    dataset,
                    batch_size=args.batch,
                    shuffle=True,
                    generator=torch.Generator().manual_seed(0),
                    collate_fn=per_caption.collator(torch.bfloat16),
                ),
            ),
            (
                "grouped by image",
                DataLoader(
                    ImageGroupedDataset(dataset),
                    batch_sampler=grouped.batch_sampler(dataset, 1, 0),
                    collate_fn=grouped.collator(torch.bfloat16),
                ),
            ),
        ]
        print(
            f"{len(dataset)} captions of {args.pictures} synthetic 640x480 pictures, tokenizer {tokenizer_name}, "
            f"{args.batches} batches a row, one process (one loader worker)"
        )
        print("| batches | captions/s per worker | captions timed |")
        print("|---|---|---|")
        for name, loader in rows:
            rate, captions = captions_per_second(loader, args.batches)
            print(f"| {name} | {rate:.1f} | {captions} |", flush=True)


if __name__ == "__main__":
    main()
