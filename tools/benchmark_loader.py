#!/usr/bin/env python3
"""How fast the training data pipeline turns COCO-shaped lines into batches, per loader worker (CPU only).

  python tools/benchmark_loader.py                        # synthetic 640x480 COCO, the tiny tokenizer
  python tools/benchmark_loader.py --tokenizer pretrained/InternVL2-2B --pictures 200

Each row reads batches in this process (one worker's work: open the JPEG, tile it to 6 + 1 thumbnail tiles of
448 px, normalise, tokenize, collate, and what the Trainer's collator adds with --bf16: the throughput counts and
the pixels cast to bf16) and prints captions/s. A GPU step must not wait for its loader: with W
workers per GPU the loader keeps up while W x captions/s here exceeds the training rate (e.g. ~100 captions/s
for the grouped mode on one H200, docs/PERFORMANCE.md). Rows:
  per caption             batches of --batch random captions (the tutorial's path and the per-caption fast mode)
  grouped, item by item   --group-pictures pictures with all their captions, each caption loading its picture
  grouped, once a picture the same batches, each picture loaded once (PicturesOnceDataset, what the Trainer uses)
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from internvl_chat.data.collator import concat_pad_data_collator, image_grouping_collator  # noqa: E402
from internvl_chat.data.dataset import PicturesOnceDataset, build_datasets, image_groups  # noqa: E402
from internvl_chat.data.preprocess import ConversationTokenizer  # noqa: E402
from internvl_chat.data.samplers import ImageGroupedBatchSampler  # noqa: E402
from internvl_chat.model.loader import load_tokenizer  # noqa: E402
from internvl_chat.synthetic.checkpoint import tokenizer_corpus  # noqa: E402
from internvl_chat.synthetic.coco import make_synthetic_coco  # noqa: E402
from internvl_chat.synthetic.tokenizer import build_tiny_tokenizer  # noqa: E402
from internvl_chat.train.trainer import COUNTS_KEY, TrainingCollator  # noqa: E402

NUM_IMAGE_TOKEN = 256  # InternVL2's tokens per 448 px tile


def captions_per_second(loader, batches: int) -> tuple[float, int]:
    captions, start = 0, time.perf_counter()
    for number, batch in enumerate(loader):
        if number == batches:
            break
        captions += batch[COUNTS_KEY].captions
    return captions / (time.perf_counter() - start), captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=None, help="a checkpoint folder whose tokenizer to use "
                                                          "(default: the repository's tiny tokenizer)")
    parser.add_argument("--pictures", type=int, default=40, help="synthetic training pictures (5 captions each)")
    parser.add_argument("--batch", type=int, default=4, help="captions per per-caption batch")
    parser.add_argument("--group-pictures", type=int, default=4, help="pictures per grouped batch")
    parser.add_argument("--batches", type=int, default=10, help="batches timed per row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.tokenizer:
            tokenizer, tokenizer_name = load_tokenizer(args.tokenizer), args.tokenizer
        else:
            tokenizer, tokenizer_name = build_tiny_tokenizer(work / "tokenizer", tokenizer_corpus()), "tiny"
        make_synthetic_coco(work / "coco", train_images=args.pictures, test_images=1, seed=0,
                            image_size=(640, 480), meta_path=work / "meta.json")
        encoder = ConversationTokenizer(tokenizer, "internlm2-chat", NUM_IMAGE_TOKEN, 4096)
        dataset = build_datasets(work / "meta.json", encoder, image_size=448, max_dynamic_patch=6)
        groups = image_groups(dataset)
        generator = torch.Generator().manual_seed(0)
        def grouped(source):
            return DataLoader(source, collate_fn=TrainingCollator(image_grouping_collator, torch.bfloat16),
                              batch_sampler=ImageGroupedBatchSampler(groups, args.group_pictures))

        rows = [("per caption", DataLoader(dataset, batch_size=args.batch, shuffle=True, generator=generator,
                                           collate_fn=TrainingCollator(concat_pad_data_collator, torch.bfloat16))),
                ("grouped, item by item", grouped(dataset)),
                ("grouped, once a picture", grouped(PicturesOnceDataset(dataset)))]
        print(f"{len(dataset)} captions of {len(groups)} synthetic 640x480 pictures, tokenizer {tokenizer_name}, "
              f"{args.batches} batches a row, one process (one loader worker)")
        print("| loading | captions/s per worker | captions timed |")
        print("|---|---|---|")
        for name, loader in rows:
            rate, captions = captions_per_second(loader, args.batches)
            print(f"| {name} | {rate:.1f} | {captions} |", flush=True)
        pixels = image_grouping_collator([dataset[i] for group in groups[:args.group_pictures] for i in group])
        print(f"of which the cast of a grouped batch's pixels {list(pixels['pixel_values'].shape)} to bf16: "
              f"{cast_milliseconds(pixels['pixel_values']):.1f} ms (median of 12, one thread as in a worker)")


def cast_milliseconds(pixels: torch.Tensor) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run with one thread each
    try:
        times = []
        for _ in range(12):
            start = time.perf_counter()
            pixels.to(torch.bfloat16)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return sorted(times)[len(times) // 2] * 1e3


if __name__ == "__main__":
    main()
