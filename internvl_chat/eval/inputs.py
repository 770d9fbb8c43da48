"""The evaluation's command line and the checks of its inputs, without torch: evaluate.sh runs them before any
process starts (python -m internvl_chat.eval.inputs ARGS), in well under a second; every process runs them again.

  python -m internvl_chat.eval.inputs --checkpoint pretrained/InternVL2-2B --datasets coco --dynamic
"""

import argparse
import os
import sys

from ..model.checkpoint_folder import CheckpointError, check_checkpoint_folder
from .caption_sets import CAPTION_SETS, read_entries
from .scoring import ScoringError, require_java

DESCRIPTION = """Caption generation and COCO scoring (internvl_chat/eval/evaluate_caption.py, started by evaluate.sh).

Each process captions a contiguous block of the test set (greedy, 8 to 30 new tokens, the original prompt); the
first gathers the captions in dataset order, writes results/<set>_<time>.json, scores it with pycocoevalcap's
scorers and appends a line to results/<checkpoint>.txt. Plain and unmerged-LoRA checkpoints load alike."""

# The original evaluation tiles with its --max-num (6), not the checkpoint's max_dynamic_patch.
EVAL_MAX_DYNAMIC_PATCH = 6


def parse_args(argv):
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="InternVL2 checkpoint folder (plain or LoRA output)")
    parser.add_argument(
        "--datasets", default="coco,flickr30k,nocaps", help="comma-separated: " + ",".join(CAPTION_SETS)
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batch on each rank (default: 32 with the fast engine, 1 with hf)",
    )
    parser.add_argument(
        "--engine",
        choices=["auto", "fast", "hf"],
        default="auto",
        help="fast: batched prefill + lean greedy decoding over a static KV cache (InternLM2 "
        "models, greedy); hf: the original's chat()/batch_chat() with generate(); "
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
    args = parser.parse_args(argv)
    unknown = [name for name in args.datasets.split(",") if name not in CAPTION_SETS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {list(CAPTION_SETS)}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def check_inputs(args, rank: int = 0) -> None:
    """What can be checked before a model is loaded, in a second: Java (for scoring), the test sets' files and
    pictures, the checkpoint folder. evaluate.sh runs this module before torchrun starts."""
    if not args.skip_scoring and rank == 0:
        require_java()  # before hours of generation, not after
    for name in args.datasets.split(","):
        entries, _ = read_entries(CAPTION_SETS[name], args.data_root)
        missing = [entry["image"] for entry in entries if not os.path.isfile(entry["image"])]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the {len(entries)} {name} test pictures are missing, the first {missing[0]}; "
                "run tools/prepare_coco.sh (it resumes), or check --data-root"
            )
    check_checkpoint_folder(args.checkpoint)


INPUT_ERRORS = (ScoringError, FileNotFoundError, CheckpointError)


def user_error_line(error: Exception) -> str:
    """The message of an error a user caused; one raised in a loader worker carries the worker's traceback as
    text, of which its last line is the message."""
    return str(error).strip().splitlines()[-1] if "Original Traceback" in str(error) else str(error)


def main(argv: list[str]) -> int:
    try:
        check_inputs(parse_args(argv))
    except INPUT_ERRORS as error:
        print(f"evaluate_caption: {user_error_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
