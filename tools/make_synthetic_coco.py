#!/usr/bin/env python3
"""Build a synthetic COCO Captions in the real Karpathy layout (no download needed).

Pictures of coloured shapes on a plain background, each with captions that describe it, written as
train2014/ and val2014/ JPEGs plus the three annotation files the fine-tune and the evaluation read:

  OUT/train2014/COCO_train2014_%012d.jpg       train images
  OUT/val2014/COCO_val2014_%012d.jpg           test images and the "restval" part of train
  OUT/annotations/                             the Karpathy train jsonl, test json and test ground truth,
                                               named as in the real download
  OUT/synthetic_scenes.json                    what each picture shows (not read by the pipeline)

The same flags always give byte-identical files. Examples:

  python tools/make_synthetic_coco.py                                   # data/coco, 300 train + 100 test images
  python tools/make_synthetic_coco.py --out data/coco_small --train-images 64 --test-images 16 \\
      --meta data/coco_small/coco_caption.json                          # and a meta file for the launcher
  internvl-validate-data --root data/coco                # check the result
"""

import argparse
import sys

from internvl_chat.devkit.coco import SyntheticCocoError, make_synthetic_coco


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}") from None
    if width < 32 or height < 32:
        raise argparse.ArgumentTypeError(f"an image must be at least 32x32, got {text}")
    return width, height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/coco", help="output root (default: %(default)s)")
    parser.add_argument(
        "--train-images",
        type=positive_int,
        default=300,
        help="train images; each gives --captions-per-image lines of the train jsonl (default: %(default)s)",
    )
    parser.add_argument(
        "--test-images", type=positive_int, default=100, help="test images, all in val2014/ (default: %(default)s)"
    )
    parser.add_argument(
        "--captions-per-image",
        type=positive_int,
        default=5,
        help="captions per image, like COCO's five (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="changes every picture and caption (default: 0)")
    parser.add_argument(
        "--meta",
        metavar="PATH",
        help="also write a meta file like shell/data/coco_caption.json that points at --out, with the right length",
    )
    parser.add_argument(
        "--image-size",
        metavar="WxH",
        type=parse_size,
        default=None,
        help="give every picture this size, e.g. 640x480 (default: a COCO-like mix of sizes)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier synthetic build in --out (a folder that is not one is never touched)",
    )
    args = parser.parse_args()

    try:
        summary = make_synthetic_coco(
            args.out,
            train_images=args.train_images,
            test_images=args.test_images,
            seed=args.seed,
            captions_per_image=args.captions_per_image,
            force=args.force,
            meta_path=args.meta,
            progress=True,
            image_size=args.image_size,
        )
    except SyntheticCocoError as error:
        sys.exit(f"make_synthetic_coco: {error}")
    by_folder = summary["train_images_by_folder"]
    print(
        f"wrote a synthetic COCO to {summary['root']} in {summary['seconds']:.1f} s "
        f"({summary['bytes'] / 2**20:.1f} MiB):"
    )
    print(
        f"  train: {summary['train_images']} images ({by_folder['train2014']} in train2014/, "
        f"{by_folder['val2014']} restval in val2014/), {summary['train_lines']} caption lines"
    )
    print(f"  test:  {summary['test_images']} images in val2014/, {summary['captions_per_image']} captions each")
    print("  sizes: " + ", ".join(f"{size} x{count}" for size, count in summary["image_sizes"].items()))
    for name, path in summary["files"].items():
        print(f"  {name:12s} {path}")


if __name__ == "__main__":
    main()
