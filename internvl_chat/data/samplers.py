"""Samplers: the original's length-grouped order, and batches that keep all captions of an image together."""

import math

import torch
from torch.utils.data import Sampler


def split_to_even_chunks(indices: list[int], lengths: list[int], num_chunks: int) -> list[list[int]]:
    """Greedy: each index goes to the chunk with the smallest total length that is not yet full."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks, totals = [[] for _ in range(num_chunks)], [0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(
    lengths: list[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """A random permutation cut into megabatches of world_size x batch_size, each sorted by length
    (longest first) and split into world_size balanced chunks; flattened."""
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    megabatch_size = world_size * batch_size
    megabatches = [
        sorted(indices[i : i + megabatch_size], key=lambda j: lengths[j], reverse=True)
        for i in range(0, len(indices), megabatch_size)
    ]
    return [
        i for megabatch in megabatches for chunk in split_to_even_chunks(megabatch, lengths, world_size) for i in chunk
    ]


class LengthGroupedSampler(Sampler):
    """The original's group_by_length sampler; world_size there is ranks x gradient-accumulation steps, so one
    megabatch is one optimizer step. With whole_steps, an epoch ends with its last complete megabatch: the
    original computed the leftover micro-batches but never applied them (transformers 5 would take an extra,
    smaller optimizer step on them at every epoch end)."""

    def __init__(self, batch_size: int, world_size: int, lengths: list[int], generator=None, whole_steps: bool = True):
        self.batch_size, self.world_size, self.lengths, self.generator = batch_size, world_size, lengths, generator
        megabatch = batch_size * world_size
        self.size = len(lengths)
        if whole_steps and len(lengths) >= megabatch:
            self.size = len(lengths) // megabatch * megabatch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        indices = length_grouped_indices(self.lengths, self.batch_size, self.world_size, self.generator)
        return iter(indices[: self.size])


class ImageGroupedBatchSampler(Sampler):
    """Batches of whole image groups (every caption of a picture in the same batch, adjacent), shuffled by
    group with a seed and the epoch, sharded over ranks. A batch holds up to `images_per_batch` groups."""

    def __init__(
        self,
        groups: list[list[int]],
        images_per_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if images_per_batch < 1:
            raise ValueError("images_per_batch must be >= 1")
        self.groups, self.images_per_batch = groups, images_per_batch
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.groups)))
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.groups), generator=generator).tolist()
        batches = [order[i : i + self.images_per_batch] for i in range(0, len(order), self.images_per_batch)]
        # every rank gets the same number of batches: wrap around rather than leave a rank idle
        per_rank = math.ceil(len(batches) / self.world_size)
        batches += batches[: per_rank * self.world_size - len(batches)]
        return [[i for g in batch for i in self.groups[g]] for batch in batches[self.rank :: self.world_size]]

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.groups) / self.images_per_batch) / self.world_size)

    def __iter__(self):
        return iter(self._batches())
