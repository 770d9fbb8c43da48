"""Check COCO caption data before hours are spent on it.

  python -m internvl_chat.data.validate                                  # data/coco (the default root)
  python -m internvl_chat.data.validate --root data/coco --workers 16    # train jsonl, test json, test gt json
  python -m internvl_chat.data.validate --meta shell/data/coco_caption.json   # what the fine-tune will read

With --root it checks the Karpathy files under ROOT/annotations/: the train jsonl (every line parses and has an
`image` and human/gpt `conversations`), the test json (a list of {image, caption: [refs]}) and the test gt json
(pycocotools loads it and it has every test image). With --meta it checks each dataset of a fine-tune meta file
(root exists, annotation is a .jsonl, `length` matches its line count) and its jsonl. Every referenced image must
exist and open with PIL. Problems are reported as `file:line: reason`; the exit status is 1 when there is any.
Both options may be given together.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

TRAIN_JSONL = "coco_karpathy_train_567k.jsonl"
TEST_JSON = "coco_karpathy_test.json"
TEST_GT_JSON = "coco_karpathy_test_gt.json"
EXPECTED_REFERENCES = 5  # COCO has five captions per image (a few have six or seven)
PROGRESS_FROM = 2000  # show progress bars only for work that takes noticeable time
JPEG_END_MARKER = b"\xff\xd9"


@dataclass
class Report:
    """Everything found: errors fail the check, warnings do not."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, dict] = field(default_factory=dict)
    images: dict[str, set[str]] = field(default_factory=dict)  # section -> image paths it uses

    @property
    def ok(self) -> bool:
        return not self.errors

    def merge(self, other: Report) -> None:
        self.errors += other.errors
        self.warnings += other.warnings
        self.counts.update(other.counts)
        self.images.update(other.images)


def _progress(iterable, total: int, description: str, show: bool):
    if not show or total < PROGRESS_FROM:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, unit="it", mininterval=1.0, file=sys.stderr)


# ----------------------------------------------------------------------------------------------- images


def check_image(path: Path, decode: bool = False) -> str | None:
    """None if the image is usable, else why not. Opening and verify() catch most damage; a JPEG without its
    end marker (a cut download) is decoded fully to be sure, and decode=True decodes every image."""
    if not path.is_file():
        return "image not found" if not path.exists() else "image path is not a file"
    try:
        with Image.open(path) as image:
            image.verify()
            jpeg = image.format == "JPEG"
        if decode or (jpeg and not _ends_like_jpeg(path)):
            with Image.open(path) as image:
                image.load()
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...)
        return f"image cannot be read ({type(error).__name__}: {error})"
    return None


def _ends_like_jpeg(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(max(path.stat().st_size - 1024, 0))
        return JPEG_END_MARKER in handle.read()


def check_images(
    images: dict[str, str], root: Path, workers: int, decode: bool, show_progress: bool, what: str
) -> list[str]:
    """Check every image (relative path -> where it is first referenced); errors in reference order."""
    names = list(images)

    def check(name: str) -> str | None:
        return check_image(root / name, decode)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(_progress(pool.map(check, names), len(names), f"checking {what} images", show_progress))
    return [
        f"{images[name]}: {name}: {problem} (looked at {root / name})"
        for name, problem in zip(names, results)
        if problem is not None
    ]


def _folder_counts(images) -> dict[str, int]:
    return dict(sorted(Counter(name.split("/")[0] if "/" in name else "." for name in images).items()))


# ----------------------------------------------------------------------------------------------- train jsonl


def _conversation_problem(record) -> str | None:
    """Why a train record cannot be used (the rules of the fine-tune's dataset), or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "image" not in record:
        return "no 'image' key (each line needs an image path relative to the dataset root)"
    image = record["image"]
    images = image if isinstance(image, list) else [image]
    if not images or not all(isinstance(name, str) and name for name in images):
        return f"'image' must be a non-empty path string (or a list of them), got {image!r}"
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return "no 'conversations' list"
    for index, turn in enumerate(conversations):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            return f"conversations[{index}] must be an object with string 'from' and 'value'"
    # The fine-tune drops a leading non-human turn (e.g. a system message), then needs human/gpt in turn.
    turns = conversations[1:] if conversations[0]["from"] != "human" else conversations
    roles = [turn["from"] for turn in turns]
    expected = ["human", "gpt"] * (len(roles) // 2 + 1)
    if len(roles) < 2 or roles != expected[: len(roles)] or roles[-1] != "gpt":
        return f"conversations must alternate human/gpt and end with gpt, got {roles}"
    if not any(turn["value"].strip() for turn in turns if turn["from"] == "gpt"):
        return "the gpt answer is empty"
    placeholders = sum(turn["value"].count("<image>") for turn in turns)
    if placeholders > len(images):
        return f"{placeholders} '<image>' placeholders but {len(images)} image(s)"
    return None


def validate_train_jsonl(
    jsonl: Path, root: Path, workers: int = 8, decode: bool = False, show_progress: bool = True, label: str = "train"
) -> Report:
    """Every line of a fine-tune jsonl parses, has image + human/gpt conversations, and its images open."""
    report = Report()
    if not jsonl.is_file():
        report.errors.append(f"{jsonl}: annotation file not found")
        return report
    images: dict[str, str] = {}  # relative path -> "file:line" that first uses it
    lines = 0
    with open(jsonl, "rb") as handle:
        total = sum(1 for _ in handle) if jsonl.stat().st_size > 10 * 2**20 else 0
    with open(jsonl, encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(_progress(handle, total, f"reading {jsonl.name}", show_progress), 1):
            lines += 1
            where = f"{jsonl}:{number}"
            if not text.strip():
                report.errors.append(f"{where}: empty line (the fine-tune parses every line as JSON)")
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                report.errors.append(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
                continue
            problem = _conversation_problem(record)
            if problem:
                report.errors.append(f"{where}: {problem}")
                continue
            for name in record["image"] if isinstance(record["image"], list) else [record["image"]]:
                images.setdefault(name, where)
    if lines == 0:
        report.errors.append(f"{jsonl}: the file is empty")
    report.errors += check_images(images, root, workers, decode, show_progress, label)
    report.counts[label] = {
        "file": str(jsonl),
        "lines": lines,
        "unique images": len(images),
        "images per folder": _folder_counts(images),
    }
    report.images[label] = set(images)
    return report


# ----------------------------------------------------------------------------------------------- test files


def image_id_from_name(name: str) -> int:
    """The evaluation's rule: 'val2014/COCO_val2014_000000391895.jpg' -> 391895."""
    return int(name.split("_")[-1][:-4])


def validate_test_json(
    test_json: Path, root: Path, workers: int = 8, decode: bool = False, show_progress: bool = True
) -> tuple[Report, set[int]]:
    """A JSON list of {image, caption: [refs]}; returns the report and the test image ids."""
    report = Report()
    ids: set[int] = set()
    if not test_json.is_file():
        report.errors.append(f"{test_json}: test annotation file not found")
        return report, ids
    try:
        entries = json.loads(test_json.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        report.errors.append(f"{test_json}: not valid JSON ({error})")
        return report, ids
    if not isinstance(entries, list) or not entries:
        report.errors.append(
            f"{test_json}: expected a non-empty JSON list of {{image, caption}} entries, got {type(entries).__name__}"
        )
        return report, ids
    images: dict[str, str] = {}
    reference_counts: Counter = Counter()
    for index, entry in enumerate(entries):
        where = f"{test_json}: entry {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            report.errors.append(f"{where}: expected an object with an 'image' path")
            continue
        name = entry["image"]
        try:
            image_id = image_id_from_name(name)
        except ValueError:
            report.errors.append(
                f"{where}: cannot derive an image id from {name!r} (the evaluation expects "
                f"names like val2014/COCO_val2014_000000391895.jpg)"
            )
            continue
        if image_id in ids:
            report.errors.append(f"{where}: image id {image_id} ({name}) appears twice")
            continue
        ids.add(image_id)
        images[name] = where
        captions = entry.get("caption")
        if (
            not isinstance(captions, list)
            or not captions
            or not all(isinstance(caption, str) and caption.strip() for caption in captions)
        ):
            report.errors.append(f"{where}: 'caption' must be a non-empty list of reference strings")
            continue
        reference_counts[len(captions)] += 1
    short = sum(count for refs, count in reference_counts.items() if refs < EXPECTED_REFERENCES)
    if short:
        report.warnings.append(
            f"{test_json}: {short} test images have fewer than {EXPECTED_REFERENCES} reference captions"
        )
    report.errors += check_images(images, root, workers, decode, show_progress, "test")
    report.counts["test"] = {
        "file": str(test_json),
        "images": len(images),
        "images per folder": _folder_counts(images),
        "references per image": dict(sorted(reference_counts.items())),
    }
    return report, ids


def validate_test_gt(gt_json: Path, test_ids: set[int]) -> Report:
    """pycocotools loads the ground truth, and it has captions for every test image."""
    report = Report()
    if not gt_json.is_file():
        report.errors.append(f"{gt_json}: ground-truth file not found")
        return report
    try:
        from pycocotools.coco import COCO
    except ImportError:
        report.errors.append(f"{gt_json}: cannot check it: pycocotools is not installed (pip install pycocotools)")
        return report
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its own progress lines
            coco = COCO(str(gt_json))
    except Exception as error:
        report.errors.append(
            f"{gt_json}: pycocotools cannot load it ({type(error).__name__}: {error}); "
            f"it must be a COCO caption dict with 'images' [{{id}}] and 'annotations' "
            f"[{{image_id, caption, id}}]"
        )
        return report
    for key in ("images", "annotations"):
        if key not in coco.dataset:
            report.errors.append(f"{gt_json}: no '{key}' list (the evaluation's loadRes needs it)")
    gt_ids = set(coco.getImgIds())
    captioned = {annotation["image_id"] for annotation in coco.dataset.get("annotations", [])}
    missing = sorted(test_ids - gt_ids)
    if missing:
        report.errors.append(
            f"{gt_json}: {len(missing)} test image ids have no entry in 'images', e.g. "
            f"{missing[:5]}; the test json and the gt json do not belong together"
        )
    uncaptioned = sorted((test_ids & gt_ids) - captioned)
    if uncaptioned:
        report.errors.append(f"{gt_json}: {len(uncaptioned)} test images have no caption, e.g. {uncaptioned[:5]}")
    extra = len(gt_ids - test_ids)
    if test_ids and extra:
        report.warnings.append(f"{gt_json}: {extra} images are not in the test json (not scored)")
    report.counts["test gt"] = {
        "file": str(gt_json),
        "images": len(gt_ids),
        "captions": len(coco.dataset.get("annotations", [])),
    }
    return report


def validate_root(root: str | Path, workers: int = 8, decode: bool = False, show_progress: bool = True) -> Report:
    """The three Karpathy files under ROOT/annotations and the images they use."""
    root = Path(root)
    report = Report()
    if not root.is_dir():
        report.errors.append(
            f"{root}: COCO root not found (run tools/prepare_coco.sh, or build a synthetic one "
            f"with python tools/make_synthetic_coco.py --out {root})"
        )
        return report
    annotations = root / "annotations"
    report.merge(validate_train_jsonl(annotations / TRAIN_JSONL, root, workers, decode, show_progress))
    test_report, test_ids = validate_test_json(annotations / TEST_JSON, root, workers, decode, show_progress)
    report.merge(test_report)
    report.merge(validate_test_gt(annotations / TEST_GT_JSON, test_ids))
    train_ids = set()
    for name in report.images.get("train", ()):
        with contextlib.suppress(ValueError, IndexError):
            train_ids.add(image_id_from_name(name))
    overlap = train_ids & test_ids
    if overlap:
        report.warnings.append(
            f"{len(overlap)} test images are also train images (e.g. id {min(overlap)}): "
            f"the test score would not measure generalisation"
        )
    return report


# ----------------------------------------------------------------------------------------------- meta


def validate_meta(meta: str | Path, workers: int = 8, decode: bool = False, show_progress: bool = True) -> Report:
    """A fine-tune meta file ({name: {root, annotation, data_augment, repeat_time, length}}) and its data.
    Relative paths are relative to the current directory, as in the launchers (run from the repository root)."""
    meta = Path(meta)
    report = Report()
    if not meta.is_file():
        report.errors.append(f"{meta}: meta file not found")
        return report
    try:
        datasets = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        report.errors.append(f"{meta}: not valid JSON ({error})")
        return report
    if not isinstance(datasets, dict) or not datasets:
        report.errors.append(f"{meta}: expected a JSON object {{dataset name: {{root, annotation, ...}}}}")
        return report
    here = Path.cwd()
    for name, entry in datasets.items():
        where = f"{meta}: {name}"
        if not isinstance(entry, dict):
            report.errors.append(f"{where}: expected an object with 'root' and 'annotation'")
            continue
        missing = [key for key in ("root", "annotation") if not isinstance(entry.get(key), str)]
        if missing:
            report.errors.append(f"{where}: missing {' and '.join(repr(key) for key in missing)}")
            continue
        root, annotation = Path(entry["root"]), Path(entry["annotation"])
        relative_note = "" if root.is_absolute() else f" (relative to {here}; run from the repository root)"
        if not entry["annotation"].endswith(".jsonl"):
            report.errors.append(f"{where}: annotation {annotation} must be a .jsonl file (one JSON object per line)")
            continue
        if not root.is_dir():
            report.errors.append(
                f"{where}: root {root} is not a folder{relative_note}; download COCO with "
                f"tools/prepare_coco.sh or build a synthetic one with tools/make_synthetic_coco.py"
            )
            continue
        if not annotation.is_file():
            report.errors.append(f"{where}: annotation {annotation} not found{relative_note}")
            continue
        repeat_time = entry.get("repeat_time", 1)
        if not isinstance(repeat_time, (int, float)) or isinstance(repeat_time, bool) or repeat_time <= 0:
            report.errors.append(f"{where}: repeat_time must be a positive number, got {repeat_time!r}")
        for flag in ("data_augment",):
            if flag in entry and not isinstance(entry[flag], bool):
                report.errors.append(f"{where}: {flag} must be true or false, got {entry[flag]!r}")
        dataset_report = validate_train_jsonl(annotation, root, workers, decode, show_progress, label=name)
        report.merge(dataset_report)
        lines = dataset_report.counts.get(name, {}).get("lines")
        length = entry.get("length")
        if length is None:
            report.warnings.append(f"{where}: no 'length' (the line count of {annotation} is {lines})")
        elif lines is not None and length != lines:
            report.warnings.append(
                f'{where}: length is {length} but {annotation} has {lines} lines; set "length": {lines}'
            )
    return report


# ----------------------------------------------------------------------------------------------- CLI


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
        prog="python -m internvl_chat.data.validate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--root", help="COCO root with annotations/ and the image folders (default: data/coco when --meta is not given)"
    )
    parser.add_argument("--meta", help="fine-tune meta json, e.g. shell/data/coco_caption.json")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="threads that check images in parallel (default: %(default)s)",
    )
    parser.add_argument(
        "--decode", action="store_true", help="decode every image fully (slower; finds damage inside the pixel data)"
    )
    parser.add_argument("--max-errors", type=int, default=20, help="errors to print (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.root is None and args.meta is None:
        args.root = "data/coco"

    report = Report()
    if args.meta:
        report.merge(validate_meta(args.meta, args.workers, args.decode, not args.quiet))
    if args.root:
        report.merge(validate_root(args.root, args.workers, args.decode, not args.quiet))
    print_report(report, args.max_errors)
    if not report.ok:
        print(f"FAILED: {len(report.errors)} problem(s); first: {report.errors[0]}", file=sys.stderr)
        return 1
    print("OK: the data is ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
