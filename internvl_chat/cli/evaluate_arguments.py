"""The evaluation's command line, and its pre-check: evaluate.sh runs this module before any process starts, without
torch, in well under a second; it prints every problem of the command line at once, one a line, and exits 2.

  python -m internvl_chat.cli.evaluate_arguments --checkpoint pretrained/InternVL2-2B --datasets coco --dynamic
"""

import argparse
import sys

from internvl_chat.eval.caption_sets import CAPTION_SETS
from internvl_chat.eval.inputs import check_inputs

DESCRIPTION = """Caption generation and COCO scoring (internvl_chat/cli/evaluate.py, started by evaluate.sh).

Each process captions a contiguous block of the test set (greedy, 8 to 30 new tokens, the original prompt); the
first gathers the captions in dataset order, writes results/<set>_<time>.json, scores it with pycocoevalcap's
scorers and appends a line to results/<checkpoint>.txt. Plain and unmerged-LoRA checkpoints load alike."""

# The original evaluation tiles with its --max-num (6), not the checkpoint's max_dynamic_patch.
EVAL_MAX_DYNAMIC_PATCH = 6

# What the pre-check's lines start with (tests/test_user_errors.py holds the launchers' messages).
PRE_CHECK_NAME = "evaluate_caption"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="InternVL2 checkpoint folder (plain or LoRA output)")
    parser.add_argument(
        "--datasets", default="coco,flickr30k,nocaps", help="comma-separated: " + ",".join(CAPTION_SETS)
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per batch on each rank (default: 32 with the fast engine, 1 with hf)",
    )
    parser.add_argument(
        "--engine",
        choices=["auto", "fast", "hf"],
        default="auto",
        help="fast: batched prefill + lean greedy decoding over a static KV cache (every size's "
        "LLM, greedy decoding only); hf: the original's chat()/batch_chat() with generate(); "
        "auto: fast where it applies",
    )
    parser.add_argument("--num-workers", type=int, default=1, help="data-loading processes per rank")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dynamic", action="store_true", help="dynamic-resolution tiles (use it: the tutorial does)")
    parser.add_argument(
        "--max-dynamic-patch",
        "--max-num",
        dest="max_dynamic_patch",
        type=int,
        default=EVAL_MAX_DYNAMIC_PATCH,
        help="most tiles per image, thumbnail excluded (default 6, the original evaluation's "
        "--max-num: the tutorial's numbers were measured so, whatever the checkpoint's "
        "max_dynamic_patch, which is 12 in the stock InternVL2 configs)",
    )
    parser.add_argument("--auto", action="store_true", help="one process, the model split over all GPUs")
    parser.add_argument("--data-root", default=None, help="folder holding data/ (default: the current folder)")
    parser.add_argument("--spice", action="store_true", help="also SPICE (needs Stanford CoreNLP; online once)")
    parser.add_argument("--skip-scoring", action="store_true", help="only write the results json")
    parser.add_argument(
        "--attn-implementation",
        default=None,
        help="eager | sdpa | flash_attention_2 (default: flash_attention_2 when flash-attn imports, "
        "else sdpa); eager is the reference maths, for the fast engine too",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="fast engine: launch each decoding step's kernels from Python instead of replaying a "
        "recorded CUDA graph (for debugging)",
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="default: bfloat16 on GPU, float32 on CPU",
    )
    return parser.parse_args(argv)


def input_problems(args: argparse.Namespace, rank: int = 0) -> list[str]:
    """Java only where the scores are computed: the first process."""
    scoring = not args.skip_scoring and rank == 0
    return check_inputs(args.checkpoint, args.datasets.split(","), args.data_root, scoring=scoring)


def print_problems(name: str, problems: list[str]) -> None:
    for problem in problems:
        print(f"{name}: {problem}", file=sys.stderr)


def main(argv: list[str]) -> int:
    problems = input_problems(parse_args(argv))
    print_problems(PRE_CHECK_NAME, problems)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
