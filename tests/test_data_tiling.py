"""Tiling and tile transforms against an independent restatement of FORMAT.md §3."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_chat.data.transforms import (
    ImageError,
    TileTransform,
    dynamic_preprocess,
    image_to_pixel_values,
    load_image,
    open_image,
    tile_grid,
)

S = 448


def restated_grid(width, height, min_num=1, max_num=6, size=S):
    """Among grids with the smallest |aspect - cols/rows|, the first in (tiles, cols) order wins unless a
    later tied grid has area > 0.5 * size^2 * tiles; the last such grid wins then."""
    grids = sorted(
        ((c, r) for c in range(1, max_num + 1) for r in range(1, max_num + 1) if min_num <= c * r <= max_num),
        key=lambda g: (g[0] * g[1], g[0]),
    )
    aspect = width / height
    best = min(abs(aspect - c / r) for c, r in grids)
    tied = [g for g in grids if abs(aspect - g[0] / g[1]) == best]
    choice = tied[0]
    for c, r in tied[1:]:
        if width * height > 0.5 * size * size * c * r:
            choice = (c, r)
    return choice


@pytest.mark.parametrize(
    "size, grid",
    [
        ((640, 480), (3, 2)),
        ((640, 427), (3, 2)),
        ((500, 375), (3, 2)),
        ((480, 640), (2, 3)),
        ((640, 640), (2, 2)),
        ((640, 360), (2, 1)),
        ((633, 633), (1, 1)),
        ((634, 634), (2, 2)),
        ((640, 512), (1, 1)),
        ((300, 300), (1, 1)),
    ],
)
def test_format_table(size, grid):
    assert tile_grid(*size) == grid == restated_grid(*size)


@pytest.mark.parametrize("max_num", [6, 12])
def test_thousands_of_random_sizes(max_num):
    rng = random.Random(max_num)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(3000)]
    sizes += [(rng.choice([448, 640, 896, 1344]), rng.choice([448, 640, 896, 1344])) for _ in range(500)]
    for width, height in sizes:
        assert tile_grid(width, height, 1, max_num) == restated_grid(width, height, 1, max_num), (width, height)


def gradient_image(width, height, mode="RGB"):
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8)).convert(mode)


def test_tiles_are_row_major_crops_with_the_thumbnail_last():
    image = gradient_image(640, 480)
    tiles = dynamic_preprocess(image, 1, 6, S, use_thumbnail=True)
    assert len(tiles) == 7
    resized = image.resize((3 * S, 2 * S), Image.BICUBIC)
    for k, tile in enumerate(tiles[:6]):
        col, row = k % 3, k // 3
        expected = resized.crop((col * S, row * S, col * S + S, row * S + S))
        assert np.array_equal(np.asarray(tile), np.asarray(expected)), k
    assert np.array_equal(np.asarray(tiles[6]), np.asarray(image.resize((S, S), Image.BICUBIC)))
    single = dynamic_preprocess(gradient_image(400, 400), 1, 6, S, use_thumbnail=True)
    assert len(single) == 1  # no thumbnail for a single tile


def reference_transform(tile, size=S, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """The torchvision Compose of the original, restated with PIL (ENVIRONMENT.md §1: bit-identical)."""
    tile = tile.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(tile, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_tile_pixels_equal_the_reference_transform():
    image = gradient_image(500, 375)
    pixel_values = image_to_pixel_values(image, TileTransform(S), max_num=6, use_thumbnail=True)
    tiles = dynamic_preprocess(image, 1, 6, S, True)
    assert pixel_values.shape == (7, 3, S, S) and pixel_values.dtype == torch.float32
    for got, tile in zip(pixel_values, tiles):
        assert torch.equal(got, reference_transform(tile))
    odd = gradient_image(300, 200)  # not S x S: resized by the transform
    assert torch.equal(TileTransform(S)(odd), reference_transform(odd))


def test_augmentation_is_reproducible_and_changes_pixels():
    image = gradient_image(448, 448)
    augmented = TileTransform(S, augment=True)
    a = augmented(image, random.Random(7))
    b = augmented(image, random.Random(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, TileTransform(S)(image))


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "CMYK", "L", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"image_{mode}.{'jpg' if mode in ('CMYK', 'L') else 'png'}"
    gradient_image(320, 240, mode).save(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (320, 240)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))  # the original's convert
    assert load_image(path).shape[1:] == (3, S, S)  # evaluation keeps the mode until each tile is converted


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(256 * 64, dtype=np.uint32).reshape(64, 256) * 4).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    image = open_image(path)
    values = np.asarray(image)[..., 0]
    assert image.mode == "RGB"
    assert values.min() == 0 and 250 <= values.max() <= 255
    assert len(np.unique(values)) > 200  # PIL's plain convert would clip almost everything to 255


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="not found: .*nowhere.jpg"):
        open_image(tmp_path / "nowhere.jpg")
    broken = tmp_path / "broken.jpg"
    gradient_image(64, 64).save(broken)
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(ImageError, match="broken.jpg"):
        open_image(broken)
