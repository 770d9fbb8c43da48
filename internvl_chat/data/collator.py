"""Batching: per caption, samples padded on the right (the original's collator); grouped by image, one sequence
per picture with all its captions."""

from dataclasses import dataclass

import torch

from .preprocess import IGNORE_INDEX

# The original pads input_ids with 0 (not the tokenizer's pad id) and derives attention_mask = ids != 0.
COLLATOR_PAD_ID = 0
# Sequences grouped by image are padded to a multiple of this. Their [B, 1, L, L] mask then always has 8-aligned
# rows, which the fused attention kernels need: torch.compile otherwise builds a second graph of every LLM block
# for unaligned lengths, and compiling it when such a batch first appears, mid-run, stalls training for tens of
# seconds.
GROUPED_LENGTH_MULTIPLE = 8


def concat_pad_data_collator(features: list[dict], pad_id: int = COLLATOR_PAD_ID) -> dict:
    """Samples padded on the right to the longest one; the tiles of all samples concatenated in sample order (the
    model writes them into the <IMG_CONTEXT> slots in that order)."""
    longest = max(len(feature["input_ids"]) for feature in features)

    def padded(key, value):
        rows = torch.full((len(features), longest), value, dtype=features[0][key].dtype)
        for row, feature in zip(rows, features):
            row[: len(feature[key])] = feature[key]
        return rows

    input_ids = padded("input_ids", pad_id)
    return {
        "input_ids": input_ids,
        "labels": padded("labels", IGNORE_INDEX),
        "attention_mask": input_ids.ne(pad_id),
        "position_ids": padded("position_ids", 0),
        "pixel_values": torch.cat([feature["pixel_values"] for feature in features]),
        "image_flags": torch.cat([feature["image_flags"] for feature in features]),
    }


def image_grouped_collator(
    features: list[dict], pad_id: int = COLLATOR_PAD_ID, length_multiple: int = GROUPED_LENGTH_MULTIPLE
) -> dict:
    """Items of whole pictures, a picture's captions adjacent (as ImageGroupedBatchSampler draws them), as one
    sequence per picture.

    A sequence is the shared prefix (system, user turn, image tokens, assistant header but for its last token)
    once, then every caption as a segment that starts with that last header token (the position whose logits
    predict the caption's first token). A segment attends to the prefix and to itself only, with positions
    continuing from the prefix, so every (context, target) pair of the per-caption batch is kept exactly, while
    the ViT and the ~1,850 prefix tokens run once per picture instead of once per caption. attention_mask is a
    boolean [B, 1, L, L] (True: may attend); L is a multiple of length_multiple (a multiple of
    GROUPED_LENGTH_MULTIPLE; larger ones give fewer distinct batch shapes)."""
    if length_multiple <= 0 or length_multiple % GROUPED_LENGTH_MULTIPLE:
        raise ValueError(f"length_multiple must be a multiple of {GROUPED_LENGTH_MULTIPLE}, got {length_multiple}")
    sequences, labels, positions, spans, pixel_values, image_flags = [], [], [], [], [], []
    for items in pictures_of(features):
        first = items[0]
        supervised = (first["labels"] != IGNORE_INDEX).nonzero()
        prefix_length = int(supervised[0]) - 1 if len(supervised) else len(first["input_ids"])
        prefix = first["input_ids"][:prefix_length]
        ids, label_parts = [prefix], [torch.full_like(prefix, IGNORE_INDEX)]
        position_parts, segment_spans = [torch.arange(prefix_length)], []
        cursor = prefix_length
        for item in items:
            if not torch.equal(item["input_ids"][:prefix_length], prefix):
                raise ValueError("the items of one picture must share the prompt (same picture, same question)")
            segment = item["input_ids"][prefix_length:]
            segment_labels = item["labels"][prefix_length:].clone()
            segment_labels[0] = IGNORE_INDEX  # the repeated header token is no target of the previous caption
            ids.append(segment)
            label_parts.append(segment_labels)
            position_parts.append(torch.arange(prefix_length, prefix_length + len(segment)))
            segment_spans.append((cursor, cursor + len(segment)))
            cursor += len(segment)
        sequences.append(torch.cat(ids))
        labels.append(torch.cat(label_parts))
        positions.append(torch.cat(position_parts))
        spans.append((prefix_length, segment_spans))
        pixel_values.append(first["pixel_values"])
        image_flags.append(first["image_flags"])

    longest = round_up(max(len(sequence) for sequence in sequences), length_multiple)
    batch = len(sequences)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    label_rows = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, longest), dtype=torch.long)
    mask = torch.zeros((batch, 1, longest, longest), dtype=torch.bool)
    for row, (sequence, label, position, (prefix_length, segment_spans)) in enumerate(
        zip(sequences, labels, positions, spans)
    ):
        input_ids[row, : len(sequence)] = sequence
        label_rows[row, : len(label)] = label
        position_ids[row, : len(position)] = position
        mask[row, 0] = image_grouped_mask(longest, prefix_length, segment_spans)
    return {
        "input_ids": input_ids,
        "labels": label_rows,
        "attention_mask": mask,
        "position_ids": position_ids,
        "pixel_values": torch.cat(pixel_values),
        "image_flags": torch.cat(image_flags),
    }


def pictures_of(features: list[dict]) -> list[list[dict]]:
    """Consecutive items of one picture (the same image_key) as one group."""
    groups = []
    for feature in features:
        if groups and int(groups[-1][-1]["image_key"]) == int(feature["image_key"]):
            groups[-1].append(feature)
        else:
            groups.append([feature])
    return groups


def image_grouped_mask(length: int, prefix_length: int, segment_spans: list[tuple[int, int]]) -> torch.Tensor:
    """[length, length] boolean mask of one picture's sequence (True: may attend): the prefix causal, each segment
    [start, end) sees the prefix and itself causally, and padding after the last segment itself only (no empty
    softmax rows)."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:prefix_length, :prefix_length] = torch.ones(prefix_length, prefix_length, dtype=torch.bool).tril()
    for start, end in segment_spans:
        mask[start:end, :prefix_length] = True
        mask[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    padding = torch.arange(segment_spans[-1][1] if segment_spans else prefix_length, length)
    mask[padding, padding] = True
    return mask


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


@dataclass(frozen=True)
class BatchCounts:
    captions: int  # runs of supervised labels: one per row, or several per row grouped by image
    lengths: list[int]  # real (not padding) tokens per row
    supervised: int  # supervised label positions
    caption_tokens: list[list[int]]  # supervised positions of each caption, row by row, in order


def batch_counts(batch: dict) -> BatchCounts:
    """What a collated batch holds, for throughput and FLOP accounting and the grouped loss's weights."""
    supervised = batch["labels"] != IGNORE_INDEX
    lengths = (batch["input_ids"] != COLLATOR_PAD_ID).sum(dim=1).tolist()
    # runs of supervised positions: +1 where one starts, -1 just past where it ends (row-major, so they pair up)
    edges = torch.nn.functional.pad(supervised.int(), (1, 1)).diff(dim=1)
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()
    caption_tokens = [[] for _ in range(supervised.shape[0])]
    for row, length in zip(starts[:, 0].tolist(), (ends[:, 1] - starts[:, 1]).tolist()):
        caption_tokens[row].append(length)
    return BatchCounts(
        captions=sum(len(runs) for runs in caption_tokens),
        lengths=lengths,
        supervised=int(supervised.sum()),
        caption_tokens=caption_tokens,
    )
