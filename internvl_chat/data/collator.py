"""Batching: pad token tensors on the right, concatenate the tiles of all samples."""
import torch

from .preprocess import IGNORE_INDEX

# The original pads input_ids with 0 (not the tokenizer's pad id) and derives attention_mask = ids != 0.
COLLATOR_PAD_ID = 0


def concat_pad_data_collator(features: list[dict], pad_id: int = COLLATOR_PAD_ID) -> dict:
    longest = max(len(feature["input_ids"]) for feature in features)

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
