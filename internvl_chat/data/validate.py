"""Checks of COCO caption data before hours are spent on it (the internvl-validate-data command,
internvl_chat/cli/validate_data.py, runs them)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .formats import (
    ANNOTATIONS_FOLDER,
    INTERNVL2_RULES,
    KARPATHY_TEST_GT_JSON,
    KARPATHY_TEST_JSON,
    KARPATHY_TRAIN_JSONL,
    CachedFileLookup,
    ConversationRules,
    MetaError,
    annotation_lines,
    image_id_from_name,
    meta_entry,
    read_line,
    read_meta_file,
)

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


def validate_train_jsonl(
    jsonl: Path,
    root: Path,
    workers: int = 8,
    decode: bool = False,
    show_progress: bool = True,
    label: str = "train",
    rules: ConversationRules = INTERNVL2_RULES,
) -> Report:
    """Every line gets the fine-tune's verdict (formats.read_line, under the template's rules), and every image of
    the usable lines opens."""
    report = Report()
    if not jsonl.is_file():
        report.errors.append(f"{jsonl}: annotation file not found")
        return report
    images: dict[str, str] = {}  # relative path -> "file:line" that first uses it
    lines = annotation_lines(jsonl)
    exists = CachedFileLookup()
    for number, raw in _progress(lines, len(lines), f"reading {jsonl.name}", show_progress):
        verdict = read_line(raw, root, exists, rules)
        if isinstance(verdict, str):
            report.errors.append(f"{jsonl}:{number}: {verdict}")
            continue
        for name in verdict.images:
            images.setdefault(name, f"{jsonl}:{number}")
    if not lines:
        report.errors.append(f"{jsonl}: the file has no annotation lines (it is empty or blank)")
    report.errors += check_images(images, root, workers, decode, show_progress, label)
    report.counts[label] = {
        "file": str(jsonl),
        "lines": len(lines),
        "unique images": len(images),
        "images per folder": _folder_counts(images),
    }
    report.images[label] = set(images)
    return report


# ----------------------------------------------------------------------------------------------- test files


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


def validate_root(
    root: str | Path,
    workers: int = 8,
    decode: bool = False,
    show_progress: bool = True,
    rules: ConversationRules = INTERNVL2_RULES,
) -> Report:
    """The three Karpathy files under ROOT/annotations and the images they use (the train file's lines under the
    template's rules)."""
    root = Path(root)
    report = Report()
    if not root.is_dir():
        report.errors.append(
            f"{root}: COCO root not found (run tools/prepare_coco.sh, or build a synthetic one "
            f"with python tools/make_synthetic_coco.py --out {root})"
        )
        return report
    annotations = root / ANNOTATIONS_FOLDER
    report.merge(
        validate_train_jsonl(annotations / KARPATHY_TRAIN_JSONL, root, workers, decode, show_progress, rules=rules)
    )
    test_report, test_ids = validate_test_json(annotations / KARPATHY_TEST_JSON, root, workers, decode, show_progress)
    report.merge(test_report)
    report.merge(validate_test_gt(annotations / KARPATHY_TEST_GT_JSON, test_ids))
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


def validate_meta(
    meta: str | Path,
    workers: int = 8,
    decode: bool = False,
    show_progress: bool = True,
    data_root: str | Path | None = None,
    rules: ConversationRules = INTERNVL2_RULES,
) -> Report:
    """A fine-tune meta file ({name: {root, annotation, data_augment, repeat_time, length}}) and its data, with the
    fine-tune's rules (formats.meta_entry): relative paths are resolved against data_root, as --data_root does,
    else the current folder, as in the launchers (run from the repository root). Unlike the fine-tune, which stops
    at the first bad entry, every entry is checked."""
    report = Report()
    try:
        datasets = read_meta_file(meta)
    except MetaError as error:
        report.errors.append(str(error))
        return report
    for name, raw in datasets.items():
        try:
            entry = meta_entry(meta, name, raw, data_root)
        except MetaError as error:
            report.errors.append(str(error))
            continue
        dataset_report = validate_train_jsonl(
            entry.annotation, entry.root, workers, decode, show_progress, label=name, rules=rules
        )
        report.merge(dataset_report)
        lines = dataset_report.counts.get(name, {}).get("lines")
        where = f"{meta}: dataset {name!r}"
        if entry.length is None:
            report.warnings.append(f"{where}: no 'length' (the line count of {entry.annotation} is {lines})")
        elif lines is not None and entry.length != lines:
            report.warnings.append(
                f'{where}: length is {entry.length} but {entry.annotation} has {lines} lines; set "length": {lines}'
            )
    return report
