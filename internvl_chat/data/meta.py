"""The meta file (shell/data/coco_caption.json format) and the annotation lines it names, checked without torch:
the launcher runs load_meta before torchrun starts, and each dataset screens its lines once when it is built.

Screening reads every line and keeps those that can be trained on as far as the line itself tells: valid JSON, a
'conversations' list, every image present on disk. The rest are reported once, in one summary, with their line
numbers, instead of being found again by every loader worker in every epoch. What only loading can tell (an image
that does not decode, a sample longer than --max_seq_length) is still found when the sample is built.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# How many bad lines a summary names; the validator (python -m internvl_chat.data.validate) lists them all.
LINES_NAMED = 5


class MetaError(ValueError):
    """A meta file or one of its entries that cannot be used; the message names the file and the entry."""


def load_meta(meta_path: str | Path, data_root: str | Path | None = None) -> dict:
    """The meta file's entries, their relative root and annotation paths resolved against data_root (default: the
    current folder), each checked to exist."""
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise MetaError(f"meta file {meta_path} does not exist")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise MetaError(f"meta file {meta_path} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or not meta:
        raise MetaError(f"meta file {meta_path} must map dataset names to {{root, annotation, ...}}")
    base = Path(data_root) if data_root else Path()
    for name, entry in meta.items():
        if not isinstance(entry, dict):
            raise MetaError(f"{meta_path}: dataset {name!r} must be an object with 'root' and 'annotation'")
        for key in ("root", "annotation"):
            if key not in entry:
                raise MetaError(f"{meta_path}: dataset {name!r} has no {key!r}")
            entry[key] = str(base / entry[key])  # an absolute path stays as it is
        if not str(entry["annotation"]).endswith(".jsonl"):
            raise MetaError(f"{meta_path}: dataset {name!r}: annotation {entry['annotation']} must be a .jsonl file")
        if not Path(entry["annotation"]).is_file():
            raise MetaError(
                f"{meta_path}: dataset {name!r}: annotation {entry['annotation']} does not exist "
                f"(run tools/prepare_coco.sh, or tools/make_synthetic_coco.py for a synthetic set)"
            )
        if not Path(entry["root"]).is_dir():
            raise MetaError(f"{meta_path}: dataset {name!r}: image root {entry['root']} does not exist")
    return meta


@dataclass
class ScreenedLines:
    """An annotation file's usable lines as (1-based line number, raw line), and its bad ones as (number, why)."""

    annotation: Path
    records: list[tuple[int, bytes]] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        named = ", ".join(f"line {number} ({why})" for number, why in self.problems[:LINES_NAMED])
        more = f" and {len(self.problems) - LINES_NAMED} more" if len(self.problems) > LINES_NAMED else ""
        total = len(self.records) + len(self.problems)
        return (
            f"{self.annotation}: {len(self.problems)} of {total:,} lines cannot be used: {named}{more} "
            f"(python -m internvl_chat.data.validate lists them all)"
        )


def image_names(item: dict) -> list[str]:
    image = item.get("image")
    if not image:
        return []
    return [image] if isinstance(image, str) else list(image)


def line_problem(raw: bytes, root: Path, exists) -> str | None:
    """Why a line cannot be used as far as the line itself tells, or None."""
    try:
        item = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"not valid JSON: {getattr(error, 'msg', error)}"
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        return "not a JSON object with a 'conversations' list"
    image = item.get("image")
    if (
        image
        and not isinstance(image, str)
        and not (isinstance(image, list) and all(isinstance(name, str) for name in image))
    ):
        return "'image' must be a path or a list of paths"
    for name in image_names(item):
        if not exists(str(root / name)):
            return f"image {name} not found under {root}"
    return None


def screen_annotation(annotation: str | Path, root: str | Path, show_progress: bool = False) -> ScreenedLines:
    """Every non-empty line of the annotation file, sorted into usable and bad ones."""
    annotation, root = Path(annotation), Path(root)
    with open(annotation, "rb") as handle:
        lines = [(number, raw) for number, raw in enumerate(handle, 1) if raw.strip()]
    found: dict[str, bool] = {}

    def exists(path: str) -> bool:  # pictures have several captions: look each up once
        if path not in found:
            found[path] = os.path.isfile(path)
        return found[path]

    screened = ScreenedLines(annotation)
    if show_progress and len(lines) >= 20_000:  # a second or more
        from tqdm import tqdm

        lines = tqdm(lines, desc=f"checking {annotation.name}", unit=" lines", mininterval=2, leave=False)
    for number, raw in lines:
        problem = line_problem(raw, root, exists)
        if problem is None:
            screened.records.append((number, raw))
        else:
            screened.problems.append((number, problem))
    return screened
