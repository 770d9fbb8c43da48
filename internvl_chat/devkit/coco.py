"""A synthetic COCO Captions in exactly the Karpathy layout that the real pipeline reads.

Every picture is a flat-coloured scene drawn with PIL: a background colour and one to four groups of shapes
(circles, squares, triangles, stars), each group one colour and shape, placed in a corner or the center of a
3x3 grid. Every image gets captions that really describe it, in a consistent COCO-like style, so a model that
learns can raise its CIDEr. All words come from `vocabulary.py`, which the tiny tokenizer is trained on.

Layout under the output root (the real data's, FORMAT.md section 4.4):

    train2014/COCO_train2014_%012d.jpg, val2014/COCO_val2014_%012d.jpg
    annotations/, the three Karpathy files under their real names (data/formats.py):
      the train jsonl                            one line per (train image, caption); train images come from
                                                 train2014/ and, like Karpathy's "restval", from val2014/
      the test json                              [{"image": "val2014/...", "caption": [refs]}]
      the test ground truth                      COCO caption format for pycocotools (formats.coco_ground_truth)
    synthetic_scenes.json                        what was drawn in each picture (tests, demo; not a COCO file)

The same arguments always give byte-identical files: every random choice comes from a generator seeded with the
seed and the image id, JPEGs use a fixed quality and carry no metadata, and nothing records a time.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from ..data.formats import (
    ANNOTATIONS_FOLDER,
    KARPATHY_TEST_GT_JSON,
    KARPATHY_TEST_JSON,
    KARPATHY_TRAIN_JSONL,
    write_ground_truth,
)
from .vocabulary import (
    BACKGROUNDS,
    BUSY_TEMPLATES,
    CAPTION_PROMPT,
    COLORS,
    COUNT_WORDS,
    LIST_TEMPLATES,
    ONE_GROUP_TEMPLATES,
    PLURALS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    TWO_GROUP_TEMPLATES,
)

SCENES_JSON = "synthetic_scenes.json"
TRAIN_DATASET_NAME = Path(KARPATHY_TRAIN_JSONL).stem  # the shipped meta file's dataset name

# (width, height) of real COCO pictures: landscape 4:3 and 3:2 most often, then portrait, square and 16:9.
# They exercise every tiling case of FORMAT.md section 3 (grids 3x2, 2x3, 2x2, 1x1 and 2x1).
IMAGE_SIZES = ((640, 480), (640, 427), (500, 375), (480, 640), (480, 480), (640, 640), (640, 360))
IMAGE_SIZE_WEIGHTS = (30, 20, 10, 15, 8, 7, 10)
# Scenes are mostly simple: a tiny model must be able to describe them within 30 new tokens.
GROUP_COUNT_WEIGHTS = {1: 40, 2: 38, 3: 16, 4: 6}
SHAPES_PER_GROUP_WEIGHTS = {1: 50, 2: 30, 3: 15, 4: 5}
MAX_SHAPES_PER_GROUP_WHEN_BUSY = 2  # three or more groups: keep each group short so captions stay short
# Karpathy's train split is train2014 plus about a quarter of its images taken from val2014 ("restval").
RESTVAL_FRACTION = 0.25
JPEG_QUALITY = 90
LARGEST_COCO_ID = 600_000
# Cells of a 3x3 grid (column, row); the caption order of groups is reading order.
GRID_CELLS = {"top left": (0, 0), "top right": (2, 0), "center": (1, 1), "bottom left": (0, 2), "bottom right": (2, 2)}
READING_ORDER = ("top left", "top right", "center", "bottom left", "bottom right")
# Radius of a single shape as a fraction of its grid cell's shorter side.
SINGLE_RADIUS = {"large": 0.44, "small": 0.22}
GROUP_RADIUS = 0.36  # fraction of a group member's slot
KARPATHY_PROMPT_TURN = "<image>\n" + CAPTION_PROMPT

assert set(POSITIONS) == set(GRID_CELLS) == set(READING_ORDER), "vocabulary.POSITIONS and the grid disagree"


class SyntheticCocoError(RuntimeError):
    """The output root cannot be written (the message says why and what to do)."""


# ----------------------------------------------------------------------------------------------- scenes


def _weighted(rng: random.Random, weights: dict | tuple, values=None):
    if isinstance(weights, dict):
        values, weights = list(weights), list(weights.values())
    return rng.choices(values, weights=weights, k=1)[0]


def _layout_group(
    rng: random.Random, cell: tuple[float, float, float, float], count: int, size: str | None
) -> list[dict]:
    """Centers and radii of `count` shapes inside a grid cell (x, y, width, height), jittered a little."""
    x0, y0, width, height = cell
    if count == 4:
        columns, rows = 2, 2
    elif width >= height:
        columns, rows = count, 1
    else:
        columns, rows = 1, count
    slot_w, slot_h = width / columns, height / rows
    if count == 1:
        radius = SINGLE_RADIUS[size] * min(width, height)
    else:
        radius = GROUP_RADIUS * min(slot_w, slot_h)
    # Move the whole group by up to 80% of the room it leaves in the cell, each shape by a few pixels more.
    group_w = (columns - 1) * slot_w + 2 * radius
    group_h = (rows - 1) * slot_h + 2 * radius
    shift_x = rng.uniform(-1, 1) * 0.4 * max(width - group_w, 0)
    shift_y = rng.uniform(-1, 1) * 0.4 * max(height - group_h, 0)
    shapes = []
    for index in range(count):
        column, row = index % columns, index // columns
        wobble = 0.05 * min(slot_w, slot_h) if count > 1 else 0.0
        center_x = x0 + (column + 0.5) * slot_w + shift_x + rng.uniform(-wobble, wobble)
        center_y = y0 + (row + 0.5) * slot_h + shift_y + rng.uniform(-wobble, wobble)
        shapes.append({"center": [round(center_x, 1), round(center_y, 1)], "radius": round(radius, 1)})
    return shapes


def make_scene(image_id: int, seed: int, image_size: tuple[int, int] | None = None) -> dict:
    """Decide everything about one picture: size, background and groups of shapes (no pixels, no captions).
    image_size fixes the size (benchmarks use 640x480, COCO's most common shape)."""
    rng = random.Random(f"synthetic-coco:{seed}:scene:{image_id}")
    width, height = _weighted(rng, IMAGE_SIZE_WEIGHTS, IMAGE_SIZES)
    if image_size is not None:
        width, height = image_size
    background = rng.choice(list(BACKGROUNDS))
    n_groups = _weighted(rng, GROUP_COUNT_WEIGHTS)
    positions = sorted(rng.sample(READING_ORDER, n_groups), key=READING_ORDER.index)
    # A shape colour must stand out from the background, and no two groups look alike.
    colors = [color for color in COLORS if color != background]
    kinds = rng.sample([(shape, color) for shape in SHAPES for color in colors], n_groups)
    cell_w, cell_h = width / 3, height / 3
    groups = []
    for position, (shape, color) in zip(positions, kinds):
        count = _weighted(rng, SHAPES_PER_GROUP_WEIGHTS)
        if n_groups >= 3:
            count = min(count, MAX_SHAPES_PER_GROUP_WHEN_BUSY)
        size = rng.choice(SIZES) if count == 1 else None
        column, row = GRID_CELLS[position]
        cell = (column * cell_w, row * cell_h, cell_w, cell_h)
        groups.append(
            {
                "shape": shape,
                "color": color,
                "count": count,
                "size": size,
                "position": position,
                "shapes": _layout_group(rng, cell, count, size),
            }
        )
    return {"image_id": image_id, "width": width, "height": height, "background": background, "groups": groups}


# ----------------------------------------------------------------------------------------------- captions


def _with_article(words: list[str]) -> str:
    """'a' before a consonant, 'an' before a vowel ("an orange circle")."""
    if words[0] == COUNT_WORDS[1] and words[1][0] in "aeiou":
        words = ["an"] + words[1:]
    return " ".join(words)


def describe_group(group: dict, with_size: bool = False) -> str:
    """'two red circles', 'a blue square', or with the size of a single shape, 'a large blue square'."""
    count = group["count"]
    noun = group["shape"] if count == 1 else PLURALS[group["shape"]]
    words = [COUNT_WORDS[count]]
    if with_size and group["size"] is not None:
        words.append(group["size"])
    return _with_article(words + [group["color"], noun])


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_candidates(scene: dict) -> list[str]:
    """Every caption that fits the scene, one per applicable template, in a fixed order."""
    groups = scene["groups"]
    fields = {
        "background": scene["background"],
        "things": _join([describe_group(group) for group in groups]),
        "sized_things": _join([describe_group(group, with_size=True) for group in groups]),
        "be": "is" if groups[0]["count"] == 1 else "are",
    }
    templates = list(LIST_TEMPLATES)
    if len(groups) == 1:
        templates += ONE_GROUP_TEMPLATES
        fields.update(
            thing=describe_group(groups[0]),
            sized_thing=describe_group(groups[0], with_size=True),
            where=POSITION_PHRASES[groups[0]["position"]],
        )
    elif len(groups) == 2:
        templates += TWO_GROUP_TEMPLATES
        fields.update(
            thing1=describe_group(groups[0]),
            where1=POSITION_PHRASES[groups[0]["position"]],
            thing2=describe_group(groups[1]),
            where2=POSITION_PHRASES[groups[1]["position"]],
        )
    else:
        templates += BUSY_TEMPLATES
    return [template.format(**fields) for template in templates]


def caption_scene(scene: dict, captions_per_image: int, seed: int) -> list[str]:
    """`captions_per_image` different captions (five, like COCO), chosen per image from the candidates."""
    rng = random.Random(f"synthetic-coco:{seed}:captions:{scene['image_id']}")
    candidates = caption_candidates(scene)
    chosen: list[str] = []
    while len(chosen) < captions_per_image:  # more captions than templates: go round again
        chosen += rng.sample(candidates, min(len(candidates), captions_per_image - len(chosen)))
    return chosen


# ----------------------------------------------------------------------------------------------- pixels


def _shape_points(shape: str, center_x: float, center_y: float, radius: float) -> list[tuple[float, float]]:
    if shape == "triangle":  # pointing up, centred on its circumcircle
        angles = [-90, 30, 150]
        return [
            (center_x + radius * math.cos(math.radians(a)), center_y + radius * math.sin(math.radians(a)))
            for a in angles
        ]
    if shape == "star":  # five points, inner radius 45% of the outer one
        points = []
        for corner in range(10):
            r = radius if corner % 2 == 0 else 0.45 * radius
            angle = math.radians(-90 + 36 * corner)
            points.append((center_x + r * math.cos(angle), center_y + r * math.sin(angle)))
        return points
    raise ValueError(f"no polygon for shape {shape!r}")


def draw_scene(scene: dict) -> Image.Image:
    """The picture of a scene as an RGB PIL image."""
    image = Image.new("RGB", (scene["width"], scene["height"]), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for group in scene["groups"]:
        fill = COLORS[group["color"]]
        for placed in group["shapes"]:
            (center_x, center_y), radius = placed["center"], placed["radius"]
            if group["shape"] == "circle":
                draw.ellipse((center_x - radius, center_y - radius, center_x + radius, center_y + radius), fill=fill)
            elif group["shape"] == "square":
                half = 0.85 * radius  # about the area of a circle of the same radius
                draw.rectangle((center_x - half, center_y - half, center_x + half, center_y + half), fill=fill)
            else:
                draw.polygon(_shape_points(group["shape"], center_x, center_y, radius), fill=fill)
    return image


# ----------------------------------------------------------------------------------------------- files


def image_path(folder: str, image_id: int) -> str:
    """'train2014/COCO_train2014_000000000009.jpg' (relative to the root, as the annotations write it)."""
    return f"{folder}/COCO_{folder}_{image_id:012d}.jpg"


def _prepare_root(root: Path, force: bool) -> None:
    """Refuse to write into a folder that holds anything, unless --force and it is an earlier synthetic build;
    then delete exactly the files that build wrote (never a real COCO download)."""
    if root.exists() and not root.is_dir():
        raise SyntheticCocoError(f"{root} is a file, not a folder; choose another --out")
    if not root.exists() or not any(root.iterdir()):
        return
    scenes_file = root / SCENES_JSON
    if not force:
        raise SyntheticCocoError(
            f"{root} already exists and is not empty; pass --force to replace an earlier synthetic build there, "
            f"or choose another --out"
        )
    if not scenes_file.is_file():
        raise SyntheticCocoError(
            f"{root} is not empty and has no {SCENES_JSON}, so it is not a synthetic build (maybe a real COCO "
            f"download); refusing to write into it even with --force. Choose another --out, or empty it yourself"
        )
    try:
        previous = json.loads(scenes_file.read_text())
        old_images = [scene["image"] for scene in previous["scenes"]]
    except (ValueError, KeyError, TypeError) as error:
        raise SyntheticCocoError(f"{scenes_file}: unreadable ({error}); delete {root} yourself and rebuild") from error
    annotations = [
        f"{ANNOTATIONS_FOLDER}/{name}" for name in (KARPATHY_TRAIN_JSONL, KARPATHY_TEST_JSON, KARPATHY_TEST_GT_JSON)
    ]
    for relative in old_images + annotations:
        (root / relative).unlink(missing_ok=True)
    scenes_file.unlink()


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary name, so an interrupted build never leaves a half file under the real name."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _assign_splits(train_images: int, test_images: int, seed: int) -> list[tuple[str, str, int]]:
    """(split, folder, image_id) for every image: test images in val2014, train images in train2014 plus a
    restval share in val2014, ids unique across both folders as in COCO."""
    rng = random.Random(f"synthetic-coco:{seed}:ids")
    ids = rng.sample(range(1, LARGEST_COCO_ID), train_images + test_images)
    restval = round(train_images * RESTVAL_FRACTION) if train_images > 1 else 0
    assigned = [("test", "val2014", image_id) for image_id in sorted(ids[:test_images])]
    train_ids = ids[test_images:]  # already in random order, so restval and train2014 images interleave
    assigned += [("train", "val2014", image_id) for image_id in train_ids[:restval]]
    assigned += [("train", "train2014", image_id) for image_id in train_ids[restval:]]
    return assigned


def write_meta(meta_path: str | Path, root: str | Path, length: int) -> Path:
    """A meta file like shell/data/coco_caption.json that points at `root` and has the right length."""
    root_text = str(root).rstrip("/") + "/"
    meta = {
        TRAIN_DATASET_NAME: {
            "root": root_text,
            "annotation": f"{root_text}{ANNOTATIONS_FOLDER}/{KARPATHY_TRAIN_JSONL}",
            "data_augment": False,
            "repeat_time": 1,
            "length": length,
        }
    }
    meta_path = Path(meta_path)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return meta_path


def make_synthetic_coco(
    root: str | Path = "data/coco",
    train_images: int = 300,
    test_images: int = 100,
    seed: int = 0,
    captions_per_image: int = 5,
    force: bool = False,
    meta_path: str | Path | None = None,
    progress: bool = False,
    image_size: tuple[int, int] | None = None,
) -> dict:
    """Build a synthetic COCO under `root` and return a summary (counts, paths, sizes, seconds).

    Raises SyntheticCocoError when `root` is not empty (see `force`) and ValueError for impossible counts."""
    if train_images < 1 or test_images < 1:
        raise ValueError(f"need at least one train and one test image (got train={train_images}, test={test_images})")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be at least 1 (got {captions_per_image})")
    if train_images + test_images >= LARGEST_COCO_ID:
        raise ValueError(f"at most {LARGEST_COCO_ID - 1} images in all (COCO ids have 6 digits)")
    start = time.perf_counter()
    root = Path(root)
    _prepare_root(root, force)
    for folder in ("train2014", "val2014", ANNOTATIONS_FOLDER):
        (root / folder).mkdir(parents=True, exist_ok=True)

    scenes = []
    for split, folder, image_id in _assign_splits(train_images, test_images, seed):
        scene = make_scene(image_id, seed, image_size)
        scene = {
            "image": image_path(folder, image_id),
            "split": split,
            **scene,
            "captions": caption_scene(scene, captions_per_image, seed),
        }
        scenes.append(scene)
    # The scene list goes first: it names every file this build writes, which is what --force deletes.
    _write_text(
        root / SCENES_JSON,
        json.dumps({"seed": seed, "captions_per_image": captions_per_image, "scenes": scenes}, indent=1) + "\n",
    )

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(scenes), desc="drawing images", unit="img", disable=None)
    for scene in scenes:
        draw_scene(scene).save(root / scene["image"], format="JPEG", quality=JPEG_QUALITY)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()

    train_scenes = [scene for scene in scenes if scene["split"] == "train"]
    test_scenes = [scene for scene in scenes if scene["split"] == "test"]
    train_lines = [
        json.dumps(
            {
                "image": scene["image"],
                "conversations": [{"from": "human", "value": KARPATHY_PROMPT_TURN}, {"from": "gpt", "value": caption}],
            }
        )
        for scene in train_scenes
        for caption in scene["captions"]
    ]
    annotations = root / ANNOTATIONS_FOLDER
    _write_text(annotations / KARPATHY_TRAIN_JSONL, "\n".join(train_lines) + "\n")
    test = [{"image": scene["image"], "caption": scene["captions"]} for scene in test_scenes]
    _write_text(annotations / KARPATHY_TEST_JSON, json.dumps(test))
    write_ground_truth(
        annotations / KARPATHY_TEST_GT_JSON,
        [
            (
                {
                    "id": scene["image_id"],
                    "file_name": Path(scene["image"]).name,
                    "width": scene["width"],
                    "height": scene["height"],
                },
                scene["captions"],
            )
            for scene in test_scenes
        ],
        info={
            "description": "synthetic COCO Karpathy test split (internvl_chat/devkit/coco.py)",
            "version": "1.0",
            "year": 2014,
        },
    )
    if meta_path is not None:
        meta_path = write_meta(meta_path, root, len(train_lines))

    folders = Counter(scene["image"].split("/")[0] for scene in train_scenes)
    total_bytes = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    return {
        "root": str(root),
        "train_images": len(train_scenes),
        "train_images_by_folder": {"train2014": folders["train2014"], "val2014": folders["val2014"]},
        "train_lines": len(train_lines),
        "test_images": len(test_scenes),
        "captions_per_image": captions_per_image,
        "image_sizes": {
            f"{w}x{h}": n for (w, h), n in sorted(Counter((s["width"], s["height"]) for s in scenes).items())
        },
        "files": {
            "train_jsonl": str(annotations / KARPATHY_TRAIN_JSONL),
            "test_json": str(annotations / KARPATHY_TEST_JSON),
            "test_gt_json": str(annotations / KARPATHY_TEST_GT_JSON),
            "scenes": str(root / SCENES_JSON),
            **({"meta": str(meta_path)} if meta_path is not None else {}),
        },
        "bytes": total_bytes,
        "seconds": round(time.perf_counter() - start, 2),
    }


def load_scenes(root: str | Path) -> list[dict]:
    """The scenes recorded by a build (what each picture shows and its captions)."""
    return json.loads((Path(root) / SCENES_JSON).read_text())["scenes"]
