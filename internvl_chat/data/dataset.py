"""Datasets of InternVL chat jsonl files, built from a meta file (shell/data/coco_caption.json format).

An item is one jsonl line: the image(s) tiled and transformed, the conversation tokenized with the label mask.
A bad line is reported with its file and line number; in strict mode it stops the run, otherwise it is skipped
and counted, so that one broken line among half a million does not kill a multi-hour job. Lines that are bad on
their face (data/formats.py's verdict: unparsable JSON, a malformed conversation, placeholders that do not match
the images, a missing image) are screened out once, when the dataset is built (data/meta.py), with one summary;
those found only when loading (an image that does not decode, a sample too long) are skipped then, the next line
taken instead, each reported once.
"""

import bisect
import json
import logging
import random
import zlib
from collections import defaultdict
from itertools import groupby
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from ..model.conversation import IMAGE_PLACEHOLDER
from .formats import CachedFileLookup, ConversationLine, MetaEntry, SampleError, load_meta, read_line
from .meta import screen_annotation
from .preprocess import ConversationTokenizer
from .transforms import ImageError, TileTransform, image_to_pixel_values, open_image

logger = logging.getLogger(__name__)
TEXT_ONLY_IMAGE_SIZE = 224  # the white dummy image of text-only samples
MAX_SKIPS_IN_A_ROW = 20


def apply_repeat_time(records: list, repeat_time: float) -> list:
    """repeat_time < 1 keeps the first fraction; a whole number repeats the whole list (MetaEntry allows no other)."""
    if repeat_time < 1:
        return records[: int(len(records) * repeat_time)]
    return records * int(repeat_time)


class SupervisedDataset(Dataset):
    def __init__(
        self,
        entry: MetaEntry,
        conversation_tokenizer: ConversationTokenizer,
        max_dynamic_patch: int,
        image_size: int = 448,
        dynamic_image_size: bool = True,
        use_thumbnail: bool = True,
        min_dynamic_patch: int = 1,
        normalize_type: str = "imagenet",
        seed: int = 42,
        strict: bool = False,
        show_progress: bool = False,
    ):
        """max_dynamic_patch: the run's tile limit, unless the entry sets its own."""
        self.name = entry.name
        self.root = entry.root
        self.annotation = entry.annotation
        self.tokenizer = conversation_tokenizer
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = entry.max_dynamic_patch if entry.max_dynamic_patch is not None else max_dynamic_patch
        self.transform = TileTransform(image_size, normalize_type, augment=entry.data_augment)
        self.seed = seed
        self.strict = strict
        self.reported: set[int] = set()  # line numbers this process has reported while loading
        self.exists = CachedFileLookup()
        screened = screen_annotation(self.annotation, self.root, show_progress, conversation_tokenizer.rules)
        if screened.problems:
            if strict:
                raise SampleError(screened.summary() + "; fix them, or leave out --strict_data to skip them")
            logger.warning("%s; they are skipped", screened.summary())
        self.skipped = len(screened.problems)
        self.records = apply_repeat_time(screened.records, entry.repeat_time)
        logger.info("dataset %s: %d samples from %s", self.name, len(self.records), self.annotation)

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        return f"{self.annotation}:{self.records[index][0]}"

    def parse(self, index: int) -> ConversationLine:
        """The line's verdict again (screening kept only the raw bytes): usable, or a SampleError saying why."""
        verdict = read_line(self.records[index][1], self.root, self.exists, self.tokenizer.rules)
        if isinstance(verdict, str):
            raise SampleError(verdict)
        return verdict

    def image_paths(self, line: ConversationLine) -> list[Path]:
        return [self.root / name for name in line.images]

    def estimated_lengths(self) -> list[int]:
        """Token-length estimates for the length-grouped sampler: the line's own `length` when present,
        else the conversation's text tokens (cached by string length, as the original does) plus the image
        tokens of the most tiles the sample can have."""
        per_image = self.tokenizer.num_image_token * (self.max_dynamic_patch + int(self.use_thumbnail))
        cache, lengths = {}, []
        for index in range(len(self.records)):
            try:
                line = self.parse(index)
            except SampleError:  # gone since screening: loading will skip it
                lengths.append(1)
                continue
            if line.length is not None:
                lengths.append(line.length)
                continue
            text = "\n".join(text for _, text in line.turns)
            if len(text) not in cache:
                cache[len(text)] = len(self.tokenizer.tokenizer(text)["input_ids"])
            lengths.append(cache[len(text)] + per_image * len(line.images))
        return lengths

    def __getitem__(self, index: int) -> dict:
        for _ in range(MAX_SKIPS_IN_A_ROW):
            try:
                return self.build(index)
            except (SampleError, ImageError) as error:
                message = f"{self.where(index)}: {error}"
                if self.strict:
                    raise SampleError(message) from error
                line = self.records[index][0]
                if line not in self.reported:  # each bad line once, not again every epoch
                    self.reported.add(line)
                    self.skipped += 1
                    logger.warning("skipping %s (%d lines skipped in this process)", message, self.skipped)
                index = (index + 1) % len(self)
        raise SampleError(
            f"{MAX_SKIPS_IN_A_ROW} bad samples in a row near {self.where(index)}; "
            f"check the file with internvl-validate-data"
        )

    def build(self, index: int, pictures: tuple[torch.Tensor, list[int]] | None = None) -> dict:
        """One sample. `pictures` (pixel values, tiles per image) stand in for loading the item's images: the
        other captions of a picture whose first caption loaded them."""
        line = self.parse(index)
        turns = list(line.turns)
        paths = self.image_paths(line)
        if paths:
            if not self.tokenizer.rules.placeholders(turns):  # the line leaves their place to us
                prefix = (
                    f"{IMAGE_PLACEHOLDER}\n"
                    if len(paths) == 1
                    else "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(len(paths)))
                )
                turns[0] = (turns[0][0], prefix + turns[0][1])
            pixel_values, num_tiles = pictures if pictures is not None else self.load_pictures(paths, index)
            image_flags = torch.ones(len(pixel_values), dtype=torch.long)
        else:
            dummy = Image.new("RGB", (TEXT_ONLY_IMAGE_SIZE, TEXT_ONLY_IMAGE_SIZE), (255, 255, 255))
            pixel_values = image_to_pixel_values(dummy, self.transform, dynamic=False)
            num_tiles, image_flags = [], torch.zeros(1, dtype=torch.long)
        sample = self.tokenizer.encode(turns, num_tiles, line.system)
        if sample.mismatch:
            logger.warning("%s: tokenization mismatch, the sample's labels are all ignored", self.where(index))
        # which picture this is, so a collator can put the captions of one picture together
        image_key = zlib.crc32(json.dumps(line.images).encode()) if paths else -1 - index
        return {
            **sample.as_dict(),
            "pixel_values": pixel_values,
            "image_flags": image_flags,
            "image_key": torch.tensor(image_key, dtype=torch.long),
        }

    def load_pictures(self, paths: list[Path], index: int) -> tuple[torch.Tensor, list[int]]:
        """The item's images tiled and transformed: pixel values of all tiles, and the tile count of each image."""
        rng = random.Random(self.seed * 1_000_003 + index)  # augmentation independent of worker assignment
        max_num = max(1, self.max_dynamic_patch // len(paths))
        tiles = [
            image_to_pixel_values(
                open_image(path),
                self.transform,
                self.dynamic_image_size,
                self.min_dynamic_patch,
                max_num,
                self.use_thumbnail,
                rng,
            )
            for path in paths
        ]
        return torch.cat(tiles), [len(t) for t in tiles]

    def items_loading_each_picture_once(self, indices: list[int]) -> list[dict]:
        """The items of these indices, where adjacent captions of one picture (as ImageGroupedBatchSampler lays
        out a batch) open, tile and transform it once, with the first caption's augmentation, and share it. The
        grouped collator keeps only the first caption's pixels of a picture, so the batch is the same as from
        item-by-item loading, without decoding every picture once per caption."""
        runs = groupby(indices, key=self.picture_of)
        return [item for _, run in runs for item in self.items_of_one_picture(list(run))]

    def picture_of(self, index: int) -> str:
        """Which picture a line shows (its image field); text-only and unreadable lines are pictures of their own."""
        try:
            images = self.parse(index).images
        except SampleError:
            return f"bad:{index}"
        return json.dumps(images) if images else f"text:{index}"

    def items_of_one_picture(self, indices: list[int]) -> list[dict]:
        if len(indices) > 1:
            try:
                paths = self.image_paths(self.parse(indices[0]))
                if paths:
                    pictures = self.load_pictures(paths, indices[0])
                    return [self.build(index, pictures) for index in indices]
            except (SampleError, ImageError):
                pass  # item by item below: it skips (or in strict mode stops at) the bad line and reports it
        return [self[index] for index in indices]

    def image_groups(self) -> list[list[int]]:
        """Indices grouped by image (all captions of one picture together), in first-seen order."""
        groups = defaultdict(list)
        for index in range(len(self.records)):
            groups[self.picture_of(index)].append(index)
        return list(groups.values())


class ImageGroupedDataset(Dataset):
    """A concatenated dataset read a batch at a time (DataLoader hands a batch sampler's indices to
    __getitems__): adjacent captions of one picture load it once (items_loading_each_picture_once). For the
    batches of ImageGroupedBatchSampler, which hold every caption of a few pictures."""

    def __init__(self, dataset: ConcatDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        sizes = self.dataset.cumulative_sizes
        items = []
        for part, run in groupby(indices, key=lambda index: bisect.bisect_right(sizes, index)):
            offset = sizes[part - 1] if part else 0
            items += self.dataset.datasets[part].items_loading_each_picture_once([index - offset for index in run])
        return items


def image_groups(dataset: ConcatDataset) -> list[list[int]]:
    """Indices of the concatenated dataset grouped by picture, over all of its parts."""
    groups, offset = [], 0
    for part in dataset.datasets:
        groups += [[offset + index for index in group] for group in part.image_groups()]
        offset += len(part)
    return groups


def build_datasets(
    meta_path: str | Path, conversation_tokenizer: ConversationTokenizer, data_root: str | Path | None = None, **options
) -> ConcatDataset:
    """One SupervisedDataset per meta entry, concatenated."""
    return ConcatDataset(
        [SupervisedDataset(entry, conversation_tokenizer, **options) for entry in load_meta(meta_path, data_root)]
    )
