"""Score a caption results file against COCO-format ground truth, e.g. on a machine that has Java when the GPU
machine does not:

  python tools/score_captions.py results/coco_241127153000.json GT_JSON   # for COCO, the Karpathy test gt json
                                                                           # under data/coco/annotations/

Prints BLEU-1..4, METEOR, ROUGE-L and CIDEr as the evaluation does (SPICE with --spice) and, with --json, writes
them to a file. Every ground-truth image needs exactly one caption.
"""

import argparse
import json
import sys
from pathlib import Path

from internvl_chat.eval.scoring import ScoringError, score_captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="[{image_id, caption}] json written by the evaluation")
    parser.add_argument("gt", help="COCO caption-format ground truth json")
    parser.add_argument("--spice", action="store_true", help="also SPICE (needs Stanford CoreNLP)")
    parser.add_argument("--json", metavar="PATH", help="also write the metrics here")
    args = parser.parse_args(argv)
    try:
        metrics = score_captions(args.results, args.gt, spice=args.spice)
    except ScoringError as error:
        sys.exit(f"score_captions: {error}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
