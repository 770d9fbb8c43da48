"""Batching: pad token tensors on the right, concatenate the tiles of all samples."""
from dataclasses import dataclass

import torch

from .preprocess import IGNORE_INDEX

# The original pads input_ids with 0 (not the tokenizer's pad id) and derives attention_mask = ids != 0.
COLLATOR_PAD_ID = 0
# Shared-image sequences are padded to a multiple of this. Their [B, 1, L, L] mask then always has 8-aligned rows,
# which the fused attention kernels need: torch.compile otherwise builds a second graph of every LLM block for
# unaligned lengths, and compiling it when such a batch first appears, mid-run, stalls training for tens of
# seconds (H100, 2026-11-28).
MASK_LENGTH_MULTIPLE = 8
# The launcher pads batches to a multiple of this (--pad_to_multiple_of), by default to the longest sample as the
# original does. A larger multiple leaves fewer distinct lengths, so cuDNN's attention builds fewer execution plans
# (137 ms forward + backward for each new length at InternVL2-2B's shape on an H200,
# tools/gpu/attention_shapes_check.py), but those are paid once per length, while the steady state measured
# slower: 22.97 captions/s padded to 16 against 24.15 and 24.01 to the longest, in alternating processes on one
# H200 (tools/benchmark_train.py, 2026-12-01). A long run is its steady state.
PAD_LENGTH_MULTIPLE = 1


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def concat_pad_data_collator(features: list[dict], pad_id: int = COLLATOR_PAD_ID, length_multiple: int = 1) -> dict:
    """Samples padded on the right to the longest one, rounded up to a multiple of length_multiple. Right pads
    change no real token's output (attention is causal) and carry no label, so the loss is the same for any
    multiple."""
    if length_multiple < 1:
        raise ValueError(f"length_multiple must be >= 1, got {length_multiple}")
    longest = round_up(max(len(feature["input_ids"]) for feature in features), length_multiple)

    def padded(key, value):
        rows = torch.full((len(features), longest), value, dtype=features[0][key].dtype)
        for row, feature in zip(rows, features):
            row[: len(feature[key])] = feature[key]
        return rows

    input_ids = padded("input_ids", pad_id)
    batch = {
        "input_ids": input_ids,
        "labels": padded("labels", IGNORE_INDEX),
        "attention_mask": input_ids.ne(pad_id),
        "position_ids": padded("position_ids", 0),
        # tiles of all samples in sample order: the model writes them into <IMG_CONTEXT> slots in that order
        "pixel_values": torch.cat([feature["pixel_values"] for feature in features]),
        "image_flags": torch.cat([feature["image_flags"] for feature in features]),
    }
    return batch


def packed_collator(features: list[dict]) -> dict:
    """Batch of samples as ONE row without padding: each sample's tokens, labels and positions (restarting at 0)
    in turn. `cu_seq_lens` (int32, [samples + 1]) holds where each sample starts and where the last ends, and
    `max_seq_len` the longest sample, so that attention keeps every sample to itself (a varlen kernel, or a
    block-diagonal causal mask). Each sample's first label is ignored: in the row, the position before it is
    the previous sample's last token, which must not be trained to predict the next sample (on its own, that
    label is never a target anyway). No attention_mask: every position is a real token."""
    lengths = [len(feature["input_ids"]) for feature in features]
    labels = [feature["labels"].clone() for feature in features]
    for sample_labels in labels:
        sample_labels[0] = IGNORE_INDEX
    cu_seq_lens = torch.zeros(len(features) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.tensor(lengths).cumsum(0)
    return {
        "input_ids": torch.cat([feature["input_ids"] for feature in features])[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat([feature["position_ids"] for feature in features])[None],
        "cu_seq_lens": cu_seq_lens,
        "max_seq_len": max(lengths),
        "pixel_values": torch.cat([feature["pixel_values"] for feature in features]),
        "image_flags": torch.cat([feature["image_flags"] for feature in features]),
    }


def shared_image_collator(groups: list[list[dict]], pad_id: int = COLLATOR_PAD_ID,
                          length_multiple: int = MASK_LENGTH_MULTIPLE) -> dict:
    """Batch of image groups, each group = the dataset items of one picture (same prompt, different captions).

    Each group becomes ONE sequence: the shared prefix (system, user turn, image tokens, assistant header but for
    its last token) once, then every caption as a segment that starts with that last header token (the position
    whose logits predict the caption's first token). A segment attends to the prefix and to itself only, with
    positions continuing from the prefix, so every (context, target) pair of the per-caption batch is kept
    exactly, while the ViT and the ~1,850 prefix tokens are computed once per picture instead of per caption.
    attention_mask is a boolean [B, 1, L, L] (True: may attend); L is a multiple of length_multiple (a multiple
    of MASK_LENGTH_MULTIPLE; larger ones give fewer distinct batch shapes)."""
    if length_multiple <= 0 or length_multiple % MASK_LENGTH_MULTIPLE:
        raise ValueError(f"length_multiple must be a multiple of {MASK_LENGTH_MULTIPLE}, got {length_multiple}")
    sequences, labels, positions, spans, pixel_values, image_flags = [], [], [], [], [], []
    for items in groups:
        first = items[0]
        supervised = (first["labels"] != IGNORE_INDEX).nonzero()
        prefix_length = int(supervised[0]) - 1 if len(supervised) else len(first["input_ids"])
        prefix = first["input_ids"][:prefix_length]
        ids, label_parts, position_parts, segment_spans = [prefix], [torch.full_like(prefix, IGNORE_INDEX)], \
            [torch.arange(prefix_length)], []
        cursor = prefix_length
        for item in items:
            if not torch.equal(item["input_ids"][:prefix_length], prefix):
                raise ValueError("items of one image group must share the prompt (same picture, same question)")
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
    batch = len(groups)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    label_rows = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, longest), dtype=torch.long)
    mask = torch.zeros((batch, 1, longest, longest), dtype=torch.bool)
    for row, (sequence, label, position, (prefix_length, segment_spans)) in enumerate(
            zip(sequences, labels, positions, spans)):
        input_ids[row, : len(sequence)] = sequence
        label_rows[row, : len(label)] = label
        position_ids[row, : len(position)] = position
        mask[row, 0] = shared_image_mask(longest, prefix_length, segment_spans)
    return {"input_ids": input_ids, "labels": label_rows, "attention_mask": mask, "position_ids": position_ids,
            "pixel_values": torch.cat(pixel_values), "image_flags": torch.cat(image_flags)}


def shared_image_mask(length: int, prefix_length: int, segment_spans: list[tuple[int, int]]) -> torch.Tensor:
    """[length, length] boolean mask of one shared-image sequence (True: may attend): the prefix causal, each
    segment [start, end) sees the prefix and itself causally, and padding after the last segment itself only
    (no empty softmax rows)."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:prefix_length, :prefix_length] = torch.ones(prefix_length, prefix_length, dtype=torch.bool).tril()
    for start, end in segment_spans:
        mask[start:end, :prefix_length] = True
        mask[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    padding = torch.arange(segment_spans[-1][1] if segment_spans else prefix_length, length)
    mask[padding, padding] = True
    return mask


def image_grouping_collator(features: list[dict]) -> dict:
    """Items arrive picture by picture (ImageGroupedBatchSampler); consecutive items of one picture form a group."""
    groups = []
    for feature in features:
        if groups and int(groups[-1][-1]["image_key"]) == int(feature["image_key"]):
            groups[-1].append(feature)
        else:
            groups.append([feature])
    return shared_image_collator(groups)


@dataclass(frozen=True)
class BatchCounts:
    captions: int  # runs of supervised labels: one per row, or several per row with a shared image prefix
    lengths: list[int]  # real (not padding) tokens per attention sequence: per row, or per sample of a packed row
    supervised: int  # supervised label positions


def batch_counts(batch: dict) -> BatchCounts:
    """What a collated batch holds, for throughput and FLOP accounting."""
    labels = batch["labels"]
    supervised = labels != IGNORE_INDEX
    if "cu_seq_lens" in batch:  # packed: attention runs per sample, not over the whole row
        lengths = batch["cu_seq_lens"].diff().tolist()
    else:
        lengths = (batch["input_ids"] != COLLATOR_PAD_ID).sum(dim=1).tolist()
    return BatchCounts(captions=int((supervised[:, 1:] & ~supervised[:, :-1]).sum()), lengths=lengths,
                       supervised=int(supervised.sum()))
