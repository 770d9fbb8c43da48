"""Images to tiles to tensors, exactly as InternVL2 does it, with PIL and torch only (no torchvision).

`dynamic_preprocess` cuts an image into a grid of square tiles whose aspect ratio is closest to the image's
(plus a thumbnail of the whole image when there is more than one tile); `TileTransform` turns each tile into a
normalised [3, S, S] tensor. Both reproduce the original pixel for pixel.
"""

import io
import random
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.4814546, 0.4578275, 0.40821073), (0.2686295, 0.2613025, 0.2757711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# Data augmentation re-encodes the image as JPEG at one of these qualities (the original's only augmentation).
JPEG_QUALITIES = tuple(range(75, 101))
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageError(ValueError):
    """An image that cannot be used; the message names the file."""


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale -> 8-bit 'L' by scaling the full range (PIL's own convert clips at 255,
    which turns most 16-bit photos white)."""
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
    return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def open_image(path: str | Path, convert_rgb: bool = True) -> Image.Image:
    """Open an image for training or evaluation.

    convert_rgb=True is the training dataset's `Image.open(path).convert('RGB')` (P, LA, RGBA, CMYK, L...);
    convert_rgb=False keeps the file's mode, as the original evaluation tiles the image before converting each
    tile. High-bit-depth images are first scaled to 8 bits in both cases."""
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError as error:
        raise ImageError(f"image not found: {path}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"cannot read image {path}: {error}") from error
    if image.mode in HIGH_BIT_DEPTH_MODES:
        image = to_8bit(image)
    if convert_rgb and image.mode != "RGB":
        image = image.convert("RGB")
    return image


@cache
def candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """(columns, rows) grids with min_num <= columns*rows <= max_num, by ascending tile count."""
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def find_closest_aspect_ratio(aspect_ratio: float, grids, width: int, height: int, image_size: int):
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for columns, rows in grids:
        diff = abs(aspect_ratio - columns / rows)
        if diff < best_diff:
            best_diff, best = diff, (columns, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * columns * rows:
            # an exact tie goes to the larger grid only when the image has the pixels to fill it
            best = (columns, rows)
    return best


def tile_grid(width: int, height: int, min_num: int = 1, max_num: int = 6, image_size: int = 448):
    return find_closest_aspect_ratio(width / height, candidate_grids(min_num, max_num), width, height, image_size)


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 6, image_size: int = 448, use_thumbnail: bool = False
) -> list[Image.Image]:
    """Row-major tiles of the resized image, then (if more than one tile) a thumbnail of the whole image."""
    columns, rows = tile_grid(image.width, image.height, min_num, max_num, image_size)
    # PIL's default resampling, as the original: bicubic, or nearest for palette and bilevel images.
    resized = image.resize((image_size * columns, image_size * rows))
    tiles = []
    for index in range(columns * rows):
        left, top = (index % columns) * image_size, (index // columns) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def jpeg_reencode(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).copy()


class TileTransform:
    """PIL tile -> float32 [3, S, S]: to RGB, bicubic resize to S x S (a no-op at that size), /255, normalise.
    With augment=True a random JPEG re-encode comes first (`rng` makes it reproducible)."""

    def __init__(self, image_size: int = 448, normalize_type: str = "imagenet", augment: bool = False):
        if normalize_type not in NORMALIZATION:
            raise ValueError(f"normalize_type must be one of {sorted(NORMALIZATION)}, got {normalize_type!r}")
        self.image_size = image_size
        self.augment = augment
        mean, std = NORMALIZATION[normalize_type]
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def to_uint8(self, tile: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if self.augment:
            tile = jpeg_reencode(tile, (rng or random).choice(JPEG_QUALITIES))
        if tile.mode != "RGB":
            tile = tile.convert("RGB")
        if tile.size != (self.image_size, self.image_size):
            tile = tile.resize((self.image_size, self.image_size), Image.BICUBIC)
        return torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, S, S] -> normalised float32."""
        return (pixels.float().div(255) - self.mean.to(pixels.device)) / self.std.to(pixels.device)

    def __call__(self, tile: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return self.normalize(self.to_uint8(tile, rng))


def image_to_pixel_values(
    image: Image.Image,
    transform: TileTransform,
    dynamic: bool = True,
    min_num: int = 1,
    max_num: int = 6,
    use_thumbnail: bool = True,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """An image as [T, 3, S, S]: dynamic tiles, or one S x S tile without dynamic resolution."""
    tiles = dynamic_preprocess(image, min_num, max_num, transform.image_size, use_thumbnail) if dynamic else [image]
    return torch.stack([transform(tile, rng) for tile in tiles])


def load_image(
    path: str | Path,
    image_size: int = 448,
    max_num: int = 6,
    use_thumbnail: bool = True,
    dynamic: bool = True,
    normalize_type: str = "imagenet",
) -> torch.Tensor:
    """The evaluation path: open (keeping the file's mode), tile, transform each tile."""
    transform = TileTransform(image_size, normalize_type)
    return image_to_pixel_values(open_image(path, convert_rgb=False), transform, dynamic, 1, max_num, use_thumbnail)
