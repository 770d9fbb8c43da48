"""The caption test sets: where each lives under the data root, its prompt, how many new tokens a caption may have,
and its pictures and references read from disk. No torch: the launcher's checks use it before any process starts."""

import json
from dataclasses import dataclass
from pathlib import Path

from ..data.formats import (
    ANNOTATIONS_FOLDER,
    CAPTION_PROMPT,  # noqa: F401  (re-exported until the caption API moves)
    KARPATHY_TEST_GT_JSON,
    KARPATHY_TEST_JSON,
    image_id_from_name,
    write_ground_truth,
)


@dataclass(frozen=True)
class CaptionSet:
    root: str
    annotation: str  # list of {image, caption}, or a COCO-format json (nocaps)
    ground_truth: str | None  # COCO-format gt; None: built from the annotation's captions
    max_new_tokens: int = 30
    min_new_tokens: int = 8


CAPTION_SETS = {
    "coco": CaptionSet(
        "data/coco/",
        f"data/coco/{ANNOTATIONS_FOLDER}/{KARPATHY_TEST_JSON}",
        f"data/coco/{ANNOTATIONS_FOLDER}/{KARPATHY_TEST_GT_JSON}",
    ),
    "flickr30k": CaptionSet("data/flickr30k/", "data/flickr30k/test_karpathy.json", None),
    "nocaps": CaptionSet(
        "data/nocaps/images/", "data/nocaps/nocaps_val_4500_captions.json", "data/nocaps/nocaps_val_4500_captions.json"
    ),
}


def read_entries(caption_set: CaptionSet, data_root: str | None = None) -> tuple[list[dict], Path | None]:
    """[{image (path), image_id}] in file order, and the ground-truth json (written next to the results for
    sets without one)."""
    base = Path(data_root) if data_root else Path(".")
    annotation = base / caption_set.annotation
    if not annotation.is_file():
        raise FileNotFoundError(
            f"{annotation} does not exist: run tools/prepare_coco.sh (or "
            f"tools/make_synthetic_coco.py) first, or pass --data-root"
        )
    data = json.loads(annotation.read_text())
    root = base / caption_set.root
    if isinstance(data, dict) and "images" in data:  # COCO format
        entries = [{"image": str(root / image["file_name"]), "image_id": int(image["id"])} for image in data["images"]]
        return entries, annotation
    entries = [
        {
            "image": str(root / item["image"]),
            "image_id": image_id_from_name(item["image"]),
            "captions": item.get("caption"),
        }
        for item in data
    ]
    if caption_set.ground_truth is not None:
        return entries, base / caption_set.ground_truth
    return entries, None


def ground_truth_from_entries(entries: list[dict], path: Path) -> Path:
    """A COCO-format gt file built from the annotation's reference captions, for sets that ship none."""
    return write_ground_truth(path, [({"id": entry["image_id"]}, entry["captions"]) for entry in entries])
