"""One optimizer step of the recipe, as a library: the step's micro-batches weighed (grouped by image, each caption's
loss rows get the weight that keeps the tutorial's loss), then each micro-batch's forward, its loss as the step
counts it and its backward.

InternVLTrainer runs these functions (weigh_step where transformers' loop fetches a step's micro-batches,
backward_micro_batch as its training_step, the loop deciding where gradients are synchronised and the optimizer
steps); tools/benchmark_train.py and tools/gpu/profile_train_step.py run the same functions through run_step, so
that they measure what training runs."""

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from .batch import TrainingBatch
from .batch_layout import BatchLayout


def caption_weights(
    batches: list[TrainingBatch], per_device_captions: int, step_captions: int | torch.Tensor, ranks: int = 1
) -> list[torch.Tensor]:
    """Each loss row's weight in one optimizer step of grouped micro-batches on one rank, [B, R] a micro-batch, on
    the device of the batch's loss targets: the tutorial's loss, generalised to a step of any number of captions.

    The tutorial's step is the mean, over its micro-batches of PER_DEVICE_BATCH_SIZE captions on all ranks, of each
    micro-batch's token-mean loss: every caption weighs 1 / BATCH_SIZE, its tokens token-meaned within its
    micro-batch. A grouped step holds whole pictures, about BATCH_SIZE captions but not exactly; each rank's captions
    are cut in order into runs of per_device_captions that stand for the tutorial's micro-batches, and a run of n
    captions weighs n / step_captions (step_captions: the step's captions on all ranks, a number or a tensor on the
    device, so that a sum over the ranks needs no wait for the GPU), its tokens token-meaned within it. So a token
    weighs (captions of its run) / (step_captions x tokens of its run): the step's loss is a mean over its captions
    whatever their number, and a step of exactly BATCH_SIZE captions has the gradient of the tutorial's micro-batches
    made of those runs (tested). The weights are multiplied by the rank's micro-batches, which each micro-batch's
    loss is divided by (backward_micro_batch), and by the ranks, whose gradients are averaged."""
    tokens = [count for batch in batches for row in batch.counts.caption_tokens for count in row]
    runs = [tokens[start : start + per_device_captions] for start in range(0, len(tokens), per_device_captions)]
    scale = len(batches) * ranks
    weights_of_captions = [scale * len(run) / sum(run) for run in runs for _ in run]
    result, cursor = [], 0
    for batch in batches:
        targets = batch.loss_rows.targets
        weights = torch.zeros(targets.shape, dtype=torch.float32)
        for row, counts in enumerate(batch.counts.caption_tokens):
            row_weights = [
                weights_of_captions[cursor + index] for index, count in enumerate(counts) for _ in range(count)
            ]
            weights[row, : len(row_weights)] = torch.tensor(row_weights)
            cursor += len(counts)
        result.append(weights.to(targets.device, non_blocking=True) / step_captions)
    return result


def weigh_step(
    batches: list[TrainingBatch],
    layout: BatchLayout,
    step_captions: int | torch.Tensor | None = None,
    ranks: int = 1,
) -> list[TrainingBatch]:
    """A step's micro-batches as the loss reads them. Grouped by image, every loss row weighed (caption_weights);
    step_captions is the step's captions on all ranks (default: these batches' own, one rank). Per caption, the
    tutorial's micro-batches are token-meaned each and averaged over the step, as they are; a step of unequal
    micro-batches (a benchmark's) weighs each by its share of the step's captions, as caption_weights does."""
    if not layout.group_by_image:
        sizes = [batch.counts.captions for batch in batches]
        if len(set(sizes)) <= 1:
            return batches
        return [dataclasses.replace(batch, share_of_step=size / sum(sizes)) for batch, size in zip(batches, sizes)]
    if step_captions is None:
        step_captions = sum(batch.counts.captions for batch in batches)
    weights = caption_weights(batches, layout.step.per_device_captions, step_captions, ranks)
    return [batch.with_loss_weights(batch_weights) for batch, batch_weights in zip(batches, weights)]


def micro_batch_loss(model, batch: TrainingBatch, layout: BatchLayout, micro_batches: int) -> torch.Tensor:
    """The micro-batch's share of the step's loss: its loss divided by the step's micro-batches (per caption, the
    mean over the tutorial's micro-batches; grouped, the weights already hold the step's shares)."""
    loss = model(**layout.model_inputs(batch)).loss
    return loss * batch.share_of_step if batch.share_of_step is not None else loss / micro_batches


def backward_micro_batch(
    model,
    batch: TrainingBatch,
    layout: BatchLayout,
    micro_batches: int,
    backward: Callable[[torch.Tensor], None],
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """One micro-batch of a step: forward (under forward_context, e.g. autocast), its share of the step's loss,
    backward(loss) (loss.backward, or the Trainer's accelerator.backward). Returns the share, detached."""
    with forward_context():
        loss = micro_batch_loss(model, batch, layout, micro_batches)
    backward(loss)
    return loss.detach()


def run_step(
    model,
    batches: list[TrainingBatch],
    layout: BatchLayout,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """A whole step's forward and backward on one rank (the optimizer step is the caller's); returns the step's
    loss, on the device."""
    total = None
    for batch in weigh_step(batches, layout):
        share = backward_micro_batch(model, batch, layout, len(batches), backward, forward_context)
        total = share if total is None else total + share
    return total
