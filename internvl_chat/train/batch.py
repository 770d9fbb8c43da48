"""The training batch, typed: what the layout's collator (batch_layout.TrainingCollator, in a loader worker) makes of
a micro-batch's captions, and what the step (train/step.py) hands the model."""

import dataclasses
from dataclasses import dataclass

import torch

from ..data.collator import BatchCounts
from ..model.modeling_internvl_chat import LossRows


@dataclass
class TrainingBatch:
    """input_ids [B, L]; pixel_values [T, 3, S, S], the tiles of all rows in row order; counts: what the collator
    counted on the host (captions, tokens, supervised positions), for throughput, FLOPs and the grouped loss's
    weights. The LLM's attention_mask is in the form its attention takes (None: plain causal, a 4D boolean or
    additive mask, or on the device a BlockMask); position_ids None means 0, 1, 2, ... in every row; image_flags None
    means every tile is a picture's. The loss reads either labels [B, L] (full logits, the original's) or loss_rows
    (the rows it reads, with their weights once the step has set them)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    counts: BatchCounts
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    image_flags: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    loss_rows: LossRows | None = None
    # per caption, in a step whose micro-batches hold different numbers of captions: this one's captions over the
    # step's (step.weigh_step); None: a step of equal micro-batches, each weighing 1 / micro-batches
    share_of_step: float | None = None

    def __post_init__(self):
        if (self.labels is None) == (self.loss_rows is None):
            raise ValueError("a training batch's loss reads labels or loss_rows, exactly one of them")

    def apply(self, function) -> "TrainingBatch":
        """The same batch with `function` applied to each of its tensors (those of loss_rows too)."""

        def each(value):
            if isinstance(value, torch.Tensor):
                return function(value)
            if isinstance(value, LossRows):
                return dataclasses.replace(
                    value, **{item.name: each(getattr(value, item.name)) for item in dataclasses.fields(value)}
                )
            return value

        return dataclasses.replace(
            self, **{item.name: each(getattr(self, item.name)) for item in dataclasses.fields(self)}
        )

    def to(self, device, non_blocking: bool = False) -> "TrainingBatch":
        """On the device (accelerate's loader calls this; from pinned memory the copies do not wait for the GPU)."""
        return self.apply(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TrainingBatch":
        """In page-locked memory (the DataLoader's pin_memory calls this in its pinning thread)."""
        return self.apply(lambda tensor: tensor.pin_memory())

    def with_loss_weights(self, weights: torch.Tensor) -> "TrainingBatch":
        return dataclasses.replace(self, loss_rows=dataclasses.replace(self.loss_rows, weights=weights))

    @property
    def tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    def forward_arguments(self) -> dict:
        """The keyword arguments of InternVLChatModel.forward (those left at their defaults are left out)."""
        arguments = {"pixel_values": self.pixel_values, "input_ids": self.input_ids}
        for name in ("attention_mask", "position_ids", "image_flags", "labels", "loss_rows"):
            value = getattr(self, name)
            if value is not None:
                arguments[name] = value
        return arguments
