"""Check COCO caption data before hours are spent on it.

  internvl-validate-data                                  # data/coco (the default root)
  internvl-validate-data --root data/coco --workers 16    # train jsonl, test json, test gt json
  internvl-validate-data --meta shell/data/coco_caption.json   # what the fine-tune will read
  internvl-validate-data --meta shell/data/coco_caption.json --data-root /data   # as --data_root /data reads it

With --root it checks the Karpathy files under ROOT/annotations/: the train jsonl, the test json (a list of
{image, caption: [refs]}) and the test gt json (pycocotools loads it and it has every test image). With --meta it
checks each dataset of a fine-tune meta file (root exists, annotation is a .jsonl, `length` matches its line count)
and its jsonl; --data-root resolves the meta file's relative paths as the fine-tune's --data_root does. Every jsonl
line gets the verdict the fine-tune's dataset gives it (valid JSON, human/gpt or user/assistant turns that
alternate, non-empty answers, no <image> placeholders or one per image, every image present; blank lines are
skipped), and every image of a usable line must open with PIL. Problems are reported as `file:line: reason`; the
exit status is 1 when there is any. Both --root and --meta may be given together. --conv-style reads the
conversations as a fine-tune of a checkpoint with that template does (internvl2_5: a leading system turn kept,
values as written, empty answers allowed, <image> counted in human turns only).
"""

import argparse
import os
import sys

from ..data.formats import conversation_rules
from ..data.validate import Report, validate_meta, validate_root
from ..model.conversation import conv_templates


def print_report(report: Report, max_errors: int, stream=None) -> None:
    stream = stream or sys.stdout
    for section, counts in report.counts.items():
        details = ", ".join(f"{key} {value}" for key, value in counts.items() if key != "file")
        print(f"{section}: {counts.get('file', '')}: {details}", file=stream)
    for warning in report.warnings:
        print(f"warning: {warning}", file=stream)
    for error in report.errors[:max_errors]:
        print(f"error: {error}", file=stream)
    if len(report.errors) > max_errors:
        print(f"... and {len(report.errors) - max_errors} more errors", file=stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="internvl-validate-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--root", help="COCO root with annotations/ and the image folders (default: data/coco when --meta is not given)"
    )
    parser.add_argument("--meta", help="fine-tune meta json, e.g. shell/data/coco_caption.json")
    parser.add_argument(
        "--data-root",
        help="resolve the meta file's relative root/annotation paths against this folder instead of the current one "
        "(the fine-tune's --data_root)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="threads that check images in parallel (default: %(default)s)",
    )
    parser.add_argument(
        "--decode", action="store_true", help="decode every image fully (slower; finds damage inside the pixel data)"
    )
    parser.add_argument(
        "--conv-style",
        default="internlm2-chat",
        choices=sorted(conv_templates),
        help="the chat template of the checkpoint the data is for (its config.json's `template`, which the fine-tune "
        "trains with), whose rules the conversations are read with (default: %(default)s)",
    )
    parser.add_argument("--max-errors", type=int, default=20, help="errors to print (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.data_root and not args.meta:
        parser.error("--data-root resolves the paths of a --meta file; give --meta too")
    if args.root is None and args.meta is None:
        args.root = "data/coco"

    report = Report()
    rules = conversation_rules(args.conv_style)
    if args.meta:
        report.merge(validate_meta(args.meta, args.workers, args.decode, not args.quiet, args.data_root, rules))
    if args.root:
        report.merge(validate_root(args.root, args.workers, args.decode, not args.quiet, rules))
    print_report(report, args.max_errors)
    if not report.ok:
        print(f"FAILED: {len(report.errors)} problem(s); first: {report.errors[0]}", file=sys.stderr)
        return 1
    print("OK: the data is ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
