"""Caption evaluation data: how a test picture becomes tiles, batches of one tile count, contiguous sharding over
ranks. Where the sets live is eval/caption_sets.py."""

import torch
from torch.utils.data import Dataset, Sampler

from ..data.transforms import TileTransform, dynamic_preprocess, open_image


class CaptionImages(Dataset):
    """Item = (image_id, [T, 3, S, S] uint8 tiles). The image is tiled in its own mode, as the original
    evaluation does, and each tile is converted to RGB by the transform. Normalisation happens on the device
    (`self.transform.normalize`): a quarter of the bytes through the loader, and no float work in the workers."""

    def __init__(
        self, entries: list[dict], image_size: int, dynamic: bool, max_dynamic_patch: int, use_thumbnail: bool
    ):
        self.entries = entries
        self.transform = TileTransform(image_size)
        self.dynamic, self.max_dynamic_patch, self.use_thumbnail = dynamic, max_dynamic_patch, use_thumbnail

    @classmethod
    def for_model(cls, entries: list[dict], config, dynamic: bool, max_dynamic_patch: int) -> "CaptionImages":
        """Tiles of the size and with the thumbnail rule of the model that captions them (its InternVLChatConfig)."""
        return cls(entries, config.tile_size, dynamic, max_dynamic_patch, config.use_thumbnail)

    def tile_counts(self) -> list[int]:
        return tile_counts(
            self.entries, self.transform.image_size, self.dynamic, self.max_dynamic_patch, self.use_thumbnail
        )

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        entry = self.entries[index]
        image = open_image(entry["image"], convert_rgb=False)
        tiles = (
            dynamic_preprocess(image, 1, self.max_dynamic_patch, self.transform.image_size, self.use_thumbnail)
            if self.dynamic
            else [image]
        )
        return entry["image_id"], torch.stack([self.transform.to_uint8(tile) for tile in tiles])


def single_threaded_worker(worker_id: int) -> None:
    """Loader workers run PIL and small tensor ops: one thread each, or N workers x all cores oversubscribe."""
    torch.set_num_threads(1)


def collate_images(batch):
    ids = [image_id for image_id, _ in batch]
    tiles = [len(pixels) for _, pixels in batch]
    return ids, torch.cat([pixels for _, pixels in batch]), tiles


def tile_counts(
    entries: list[dict], image_size: int, dynamic: bool, max_dynamic_patch: int, use_thumbnail: bool
) -> list[int]:
    """Tiles per image from the image headers alone (no decoding)."""
    from PIL import Image

    from ..data.transforms import tile_grid

    counts = []
    for entry in entries:
        if not dynamic:
            counts.append(1)
            continue
        with Image.open(entry["image"]) as image:
            columns, rows = tile_grid(image.width, image.height, 1, max_dynamic_patch, image_size)
        counts.append(columns * rows + (1 if use_thumbnail and columns * rows > 1 else 0))
    return counts


class TileGroupedBatches(Sampler):
    """Batches of images with the same tile count, from one rank's indices (so prompts need no padding)."""

    def __init__(self, indices: list[int], counts: list[int], batch_size: int):
        by_count = {}
        for index in indices:
            by_count.setdefault(counts[index], []).append(index)
        self.batches = [
            group[i : i + batch_size] for _, group in sorted(by_count.items()) for i in range(0, len(group), batch_size)
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def split_into_chunks(batches: list[list[int]], parts: int) -> list[list[list[int]]]:
    """Each batch as up to `parts` chunks of consecutive indices. The loader's workers each build one chunk, so
    the first batch is ready after one chunk's time instead of a whole batch's (a 128-image batch is ~3 s of
    decoding and resizing for one worker)."""
    chunked = []
    for batch in batches:
        size = -(-len(batch) // max(parts, 1))
        chunked.append([batch[i : i + size] for i in range(0, len(batch), size)])
    return chunked


class ContiguousShardSampler(Sampler):
    """Rank r takes one contiguous block; the first (N mod world) ranks take one extra item. Gathering the
    ranks' outputs in rank order restores the dataset order."""

    def __init__(self, size: int, rank: int, world_size: int):
        base, extra = divmod(size, world_size)
        start = rank * base + min(rank, extra)
        self.indices = list(range(start, start + base + (1 if rank < extra else 0)))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)
