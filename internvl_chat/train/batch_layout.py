"""How the training arguments become batches: the one place that decides, for a run, the order of the captions
(sampler), how they are collated, which attention the LLM runs and what the model is handed.

The fine-tuning entry point and tools/benchmark_train.py both build a BatchLayout and go through it, so a
benchmark measures exactly what the trainer runs. Two layouts exist:

- per caption (the tutorial's): one sequence per caption, padded on the right to the longest of the batch;
  with --group_by_length in the original's length-grouped order;
- grouped by image (--group_by_image): one sequence per picture, its prompt and image tokens once and then every
  caption of the picture, each caption attending to the prompt and to itself only (a [B, 1, L, L] mask).

Either may add --supervised_logits_only: the LM head and the loss only at the supervised positions (LossRows).
The same captions give the same loss and gradients in every combination (tests/test_train_fast_modes.py).

The work that needs no GPU (counting, the loss rows, turning the mask into the form the LLM's attention takes)
runs in the loader workers (TrainingCollator), where it costs the GPU nothing; model_inputs() does on the device
only what must be done there.
"""

import logging
from dataclasses import dataclass, field

import torch
from torch.utils.data import ConcatDataset, Sampler

from ..data.collator import batch_counts, concat_pad_data_collator, image_grouped_collator
from ..data.preprocess import IGNORE_INDEX
from ..data.samplers import ImageGroupedBatchSampler, LengthGroupedSampler
from ..model.modeling_internvl_chat import LossRows
from .attention import PREFIX_SPLIT_ATTENTION, block_mask_from_dense, causal_head_length
from .batch import TrainingBatch
from .step_shape import StepShape, decide_step_shape

logger = logging.getLogger("internvl_chat.train")
# The LLM attentions that take the [B, 1, L, L] mask of sequences grouped by image; flash attention does not.
GROUPED_ATTENTIONS = (PREFIX_SPLIT_ATTENTION, "flex_attention", "sdpa", "eager")


@dataclass(frozen=True)
class BatchLayout:
    group_by_image: bool = False
    group_by_length: bool = False
    supervised_logits_only: bool = False
    # the attention asked for with --attn_implementation (None: the model's default)
    requested_attention: str | None = None
    # the run's step (step_shape.decide_step_shape); None: 4 micro-batches of 4 captions, as the demo's
    step: StepShape | None = None
    llm_attention: str | None = field(init=False, default=None)

    def __post_init__(self):
        if self.step is None:
            object.__setattr__(self, "step", decide_step_shape(4, 1, self.group_by_image, accumulation=4))
        if self.step.micro_batch != self.step.per_device_captions and not self.group_by_image:
            raise ValueError("only a layout grouped by image reshapes the tutorial's micro-batches")
        if self.group_by_image and self.group_by_length:
            raise ValueError("--group_by_image orders whole pictures; it cannot also follow --group_by_length")
        if self.group_by_image:
            attention = self.requested_attention
            object.__setattr__(
                self, "llm_attention", attention if attention in GROUPED_ATTENTIONS else PREFIX_SPLIT_ATTENTION
            )
        else:
            object.__setattr__(self, "llm_attention", self.requested_attention)

    @classmethod
    def from_arguments(cls, model_args, data_args, fast_args, step: StepShape) -> "BatchLayout":
        return cls(
            group_by_image=fast_args.group_by_image,
            group_by_length=data_args.group_by_length and not fast_args.group_by_image,
            supervised_logits_only=fast_args.supervised_logits_only,
            requested_attention=model_args.attn_implementation,
            step=step,
        )

    @property
    def uses_loss_rows(self) -> bool:
        """The loss through LossRows: with supervised logits only, and grouped by image, where each caption's rows
        carry the weight that keeps the tutorial's loss (step.caption_weights)."""
        return self.supervised_logits_only or self.group_by_image

    def describe(self) -> str:
        parts = ["grouped by image" if self.group_by_image else "per caption"]
        if self.group_by_length:
            parts.append("length-grouped order")
        if self.supervised_logits_only:
            parts.append("supervised logits only")
        return ", ".join(parts)

    # ------------------------------------------------------------------ the model
    def attn_implementation(self) -> str | dict | None:
        """The attn_implementation to load the model with. Grouped by image, the LLM needs an attention that takes
        the captions' mask: the prefix split, unless flex_attention, sdpa or eager is asked for; the ViT keeps what
        was asked for."""
        if not self.group_by_image:
            return self.requested_attention
        return {"vision_config": self.requested_attention, "llm_config": self.llm_attention}

    def computes_last_layer_at_rows(self, model) -> bool:
        """With supervised logits only, the LLM computes its last layer at the supervised rows only (LossRows.mask)
        where its decoder steps can (every InternVL2 family's); the FLOP count follows that."""
        return self.supervised_logits_only and model.decoder_steps.supports_output_rows

    # ------------------------------------------------------------------ order and batches
    def sampler(
        self, lengths: list[int], per_device_batch: int, ranks_times_accumulation: int, seed: int
    ) -> Sampler | None:
        """A per-caption run's order: the original's length-grouped sampler with --group_by_length (its megabatch
        is one optimizer step: ranks x accumulation micro-batches), else None (transformers' random order)."""
        if not self.group_by_length:
            return None
        return LengthGroupedSampler(per_device_batch, ranks_times_accumulation, lengths, seed)

    def batch_sampler(self, dataset: ConcatDataset, world_size: int, seed: int) -> ImageGroupedBatchSampler:
        """A grouped run's micro-batches: whole pictures with all their captions, the tutorial's captions a step
        (per-device batch x accumulation on each rank), the pictures in a seeded random order."""
        from ..data.dataset import image_groups

        return ImageGroupedBatchSampler(
            image_groups(dataset), self.step.captions_per_process, self.step.micro_batches, world_size, seed
        )

    def step_summary(self, dataset: ConcatDataset, world_size: int, seed: int) -> str:
        """Steps an epoch, captions and pictures a step (all ranks), as the run will take them."""
        step = self.step
        if not self.group_by_image:
            captions = step.captions_per_process * world_size
            return (
                f"{len(dataset) // captions:,} optimizer steps an epoch, {captions} captions a step (one picture "
                f"each, {step.per_device_captions} a micro-batch, {step.accumulation} micro-batches a step on each "
                f"of {world_size} process(es))"
            )
        sampler = self.batch_sampler(dataset, world_size, seed)
        pictures = sampler.steps_of_pictures()
        captions = sum(len(sampler.groups[picture]) for bucket in pictures for picture in bucket)
        return (
            f"{sampler.steps:,} optimizer steps an epoch, {captions / max(sampler.steps, 1):.1f} captions a step "
            f"on average (the tutorial's {step.captions_per_process * world_size}) of "
            f"{sum(len(bucket) for bucket in pictures) / max(sampler.steps, 1):.1f} whole pictures; "
            f"{step.micro_batches} micro-batch(es) a step of up to about {step.micro_batch} captions on each of "
            f"{world_size} process(es)"
        )

    def collator(self, float_dtype: torch.dtype | None = None) -> "TrainingCollator":
        return TrainingCollator(self, float_dtype)

    def model_inputs(self, batch: TrainingBatch) -> dict:
        """A batch on the device -> the model's keyword arguments; on a GPU the mask that flex attention reads as a
        BlockMask (built from the dense mask's blocks, on the device)."""
        inputs = batch.forward_arguments()
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.dtype == torch.bool:
            if self.llm_attention == "flex_attention" or (
                self.llm_attention == PREFIX_SPLIT_ATTENTION and mask.is_cuda
            ):
                inputs["attention_mask"] = block_mask_from_dense(mask)
        return inputs


class TrainingCollator:
    """The layout's collator, run in the loader workers. On top of padding (per caption) or grouping (by image) it
    does what would otherwise make the training process wait for the GPU:
    - counts the batch's captions, tokens and supervised positions for throughput and FLOP logging;
    - with supervised logits only, finds the loss rows and their rows of the attention mask (the slot count sets
      tensor shapes, so on the device it would be a host wait);
    - turns the mask into what the LLM's attention takes: a right-padding mask into none at all (under causal
      attention no real token sees a pad on its right) with the pads' positions continued, so that SDPA and
      flash attention run their unmasked causal kernels; the prefix split's mask into its tail rows; eager
      attention's into an additive bias;
    - leaves out position ids that are 0, 1, 2, ... in every row (the LLM numbers them so itself, and InternLM2
      then skips transformers' check for packed sequences, another host wait) and image_flags when every tile is
      a picture's (their selection would wait for the GPU too);
    - casts the pixels to `float_dtype`, the dtype the model computes in (half the bytes to copy to the GPU).
    """

    def __init__(self, layout: BatchLayout, float_dtype: torch.dtype | None = None):
        self.layout = layout
        self.float_dtype = float_dtype
        self.collate = image_grouped_collator if layout.group_by_image else concat_pad_data_collator

    def __call__(self, features: list[dict]) -> TrainingBatch:
        batch = self.collate(features)
        counts = batch_counts(batch)
        labels, rows = batch.pop("labels"), None
        if self.layout.uses_loss_rows:
            positions, targets, rows_mask = loss_rows(labels, batch.get("attention_mask"))
            if not self.layout.supervised_logits_only:  # grouped with full logits: the whole last layer, then its rows
                rows_mask = None
            rows, labels = LossRows(positions, targets, rows_mask), None
        if "image_flags" in batch and bool(batch["image_flags"].all()):
            del batch["image_flags"]
        mask = batch.get("attention_mask")
        if only_right_padding(mask):
            keep = batch.pop("attention_mask").bool()
            batch["position_ids"] = positions_through_padding(batch["position_ids"], keep)
        elif mask is not None and mask.dim() == 4:
            batch["attention_mask"] = self.mask_for_attention(mask)
        positions = batch.get("position_ids")
        if positions is not None and torch.equal(positions, torch.arange(positions.shape[1]).expand_as(positions)):
            del batch["position_ids"]
        if self.float_dtype is not None:
            batch["pixel_values"] = batch["pixel_values"].to(self.float_dtype)
        return TrainingBatch(counts=counts, labels=labels, loss_rows=rows, **batch)

    def mask_for_attention(self, mask: torch.Tensor) -> torch.Tensor:
        attention = self.layout.llm_attention
        if attention == PREFIX_SPLIT_ATTENTION:
            return mask[:, :, causal_head_length(mask) :]
        if attention == "eager":  # eager attention adds its mask to the scores
            dtype = self.float_dtype or torch.float32
            return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        return mask


def only_right_padding(attention_mask: torch.Tensor | None) -> bool:
    """A 2D [batch, length] mask whose rows are all ones then all zeros (concat_pad_data_collator's padding)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return False
    keep = attention_mask.bool()
    return bool(keep[:, 0].all() & (keep[:, 1:] <= keep[:, :-1]).all())


def positions_through_padding(position_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Right padding's position ids continued one by one from the last real token. The collator pads them with 0
    as the original does, and transformers reads a position that restarts as the start of another packed sequence:
    it would then build a dense mask instead of letting SDPA run its causal kernel (no real token attends to a pad,
    so the pads' positions change nothing else)."""
    lengths = keep.sum(dim=-1, keepdim=True)
    last = position_ids.gather(-1, (lengths - 1).clamp(min=0))
    steps = torch.arange(position_ids.shape[-1]) - lengths + 1
    return torch.where(keep, position_ids, last + steps)


def loss_rows(
    labels: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The positions a loss reads (t, where label t + 1 is supervised), their targets and their rows of the
    attention mask: [B, R], [B, R] and [B, 1, R, L] (bool, True: may attend), R being the most supervised
    positions any sequence has. A sequence's spare slots hold unsupervised positions with target -100. The mask is
    taken from attention_mask as collated: a boolean [B, 1, L, L] mask, a 2D padding mask, or none (causal)."""
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    slots = max(int(supervised.sum(dim=1).max()), 1)
    positions = torch.sort((~supervised).to(torch.uint8), dim=1, stable=True).indices[:, :slots]
    slot_targets = targets.gather(1, positions)
    length = labels.shape[1]
    keys = torch.arange(length)
    own = keys[None, None, :] == positions[:, :, None]
    causal = keys[None, None, :] <= positions[:, :, None]
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = attention_mask[:, 0].gather(1, positions[:, :, None].expand(-1, -1, length))
    elif attention_mask is not None:
        allowed = causal & attention_mask.bool()[:, None, :]
    else:
        allowed = causal
    # A spare slot's position may see no key at all (a pad); seeing itself keeps its discarded output finite,
    # which matters: 0 x NaN in the backward would still be NaN.
    return positions, slot_targets, (allowed | own)[:, None]
