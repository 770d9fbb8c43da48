"""Samplers: the original's length-grouped order, and batches that keep all captions of an image together."""

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
    smaller optimizer step on them at every epoch end).

    An epoch's order is a function of the seed and the epoch (set_epoch) alone, so that a resumed run draws the
    order of the epoch it resumes in, whatever was drawn before it."""

    def __init__(self, batch_size: int, world_size: int, lengths: list[int], seed: int = 0, whole_steps: bool = True):
        self.batch_size, self.world_size, self.lengths = batch_size, world_size, lengths
        self.seed, self.epoch = seed, 0
        megabatch = batch_size * world_size
        self.size = len(lengths)
        if whole_steps and len(lengths) >= megabatch:
            self.size = len(lengths) // megabatch * megabatch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        indices = length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator)
        return iter(indices[: self.size])


class ImageGroupedBatchSampler(Sampler):
    """Optimizer steps of whole pictures (each picture's captions adjacent, in one micro-batch) that hold as many
    captions as the tutorial's steps: about `captions_per_step` on every rank, BATCH_SIZE / ranks.

    An epoch is a seeded random order of the pictures (a new one each epoch, set_epoch), cut into steps: each takes
    the next pictures while that brings the captions the steps have taken so far closer to captions_per_step times
    the steps (the error carried from step to step, so that steps of 5- to 7-caption pictures average the budget).
    It has the tutorial's number of steps, the whole steps its captions fill with a picture to spare on every rank;
    the pictures left over are dropped, as the tutorial drops the captions of its last, incomplete step. Each step's
    pictures are split into `micro_batches_per_step` micro-batches of about equal captions, in order.

    Micro-batches come out in the order accelerate deals a batch sampler's batches out to the ranks (batch i to rank
    i mod world): step by step, micro-batch by micro-batch, rank by rank."""

    def __init__(
        self,
        groups: list[list[int]],
        captions_per_step: int,
        micro_batches_per_step: int = 1,
        world_size: int = 1,
        seed: int = 0,
    ):
        largest = max(len(group) for group in groups)
        if captions_per_step < 1 or micro_batches_per_step < 1:
            raise ValueError("captions_per_step and micro_batches_per_step must be >= 1")
        self.groups, self.budget, self.micro = groups, captions_per_step, micro_batches_per_step
        self.world_size, self.seed, self.epoch = world_size, seed, 0
        captions = sum(len(group) for group in groups)
        self.steps = max((captions - largest * world_size) // (captions_per_step * world_size), 0)
        if self.steps * world_size * micro_batches_per_step > len(groups):
            raise ValueError(
                f"{len(groups)} pictures cannot fill {self.steps} steps of {micro_batches_per_step} "
                f"micro-batches on {world_size} rank(s)"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps_of_pictures(self) -> list[list[int]]:
        """The epoch's steps (one per rank and step, in rank order within a step), as lists of picture numbers."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.groups), generator=generator).tolist()
        buckets, cursor, carry = [], 0, 0
        for _ in range(self.steps * self.world_size):
            wanted, taken, count = self.budget - carry, [], 0
            while cursor < len(order):
                size = len(self.groups[order[cursor]])
                if len(taken) >= self.micro and abs(count + size - wanted) >= abs(count - wanted):
                    break
                taken.append(order[cursor])
                count += size
                cursor += 1
            buckets.append(taken)
            carry += count - self.budget
        return buckets

    def split(self, pictures: list[int]) -> list[list[int]]:
        """A step's pictures as micro_batches_per_step runs of about equal captions (at least one picture each)."""
        parts, start = [], 0
        remaining = sum(len(self.groups[picture]) for picture in pictures)
        for left in range(self.micro, 0, -1):
            target, count, end = remaining / left, 0, start
            while end < len(pictures) - (left - 1) and (
                end == start or count + len(self.groups[pictures[end]]) / 2 <= target
            ):
                count += len(self.groups[pictures[end]])
                end += 1
            parts.append(pictures[start:end])
            remaining -= count
            start = end
        parts[-1] += pictures[start:]
        return parts

    def __iter__(self):
        buckets = self.steps_of_pictures()
        for step in range(self.steps):
            splits = [self.split(buckets[step * self.world_size + rank]) for rank in range(self.world_size)]
            for micro in range(self.micro):
                for rank in range(self.world_size):
                    yield [index for picture in splits[rank][micro] for index in self.groups[picture]]

    def __len__(self) -> int:
        return self.steps * self.micro * self.world_size
