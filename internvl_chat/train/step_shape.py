"""How a run's optimizer step is made of micro-batches, decided in one place: from the launcher's BATCH_SIZE (passed
through as --global_batch_size), PER_DEVICE_BATCH_SIZE (--per_device_train_batch_size) and the number of processes,
and, grouped by image, as fewer, larger micro-batches of whole pictures holding the same captions.

Without torch, so that the launcher checks it before torchrun starts (train/preflight.py) with the rule the entry
point then applies (decide_step_shape), once, before the Trainer and DeepSpeed are built."""

from dataclasses import dataclass

# A grouped micro-batch holds up to this many captions (about 4 pictures): about the tokens of the tutorial's
# micro-batch of 4 captions, since the pictures' prompts are not repeated.
GROUPED_MICRO_BATCH_CAPTIONS = 20
# ... and at least this many, so that a micro-batch has room for the largest COCO pictures' captions.
GROUPED_MICRO_BATCH_MIN_CAPTIONS = 8


class StepShapeError(ValueError):
    pass


@dataclass(frozen=True)
class StepShape:
    """per_device_captions and accumulation: the tutorial's step on each process (PER_DEVICE_BATCH_SIZE captions a
    micro-batch, that many micro-batches). micro_batch and micro_batches: what transformers and DeepSpeed iterate,
    the same per caption; grouped by image, a caption budget of whole pictures and fewer micro-batches, with the same
    product."""

    per_device_captions: int
    accumulation: int
    micro_batch: int
    micro_batches: int

    @property
    def captions_per_process(self) -> int:
        return self.per_device_captions * self.accumulation


def tutorial_accumulation(global_batch_size: int, per_device_captions: int, processes: int) -> int:
    """The launcher's GRADIENT_ACC: BATCH_SIZE / (PER_DEVICE_BATCH_SIZE x processes), which must divide."""
    per_step = per_device_captions * processes
    if global_batch_size < 1 or global_batch_size % per_step:
        raise StepShapeError(
            f"BATCH_SIZE={global_batch_size} is not a multiple of PER_DEVICE_BATCH_SIZE x GPUS x NNODES = {per_step}"
        )
    return global_batch_size // per_step


def grouped_micro_batches(per_device_captions: int, accumulation: int) -> tuple[int, int]:
    """(captions a micro-batch, micro-batches a step) grouped by image: the accumulation divided by the largest of its
    divisors k that keeps a micro-batch's caption budget (k x per-device batch) within GROUPED_MICRO_BATCH_CAPTIONS,
    and the per-device batch multiplied by it; the product, and so the global batch, is the tutorial's."""
    divisors = [k for k in range(1, accumulation + 1) if accumulation % k == 0]
    fitting = [k for k in divisors if per_device_captions * k <= GROUPED_MICRO_BATCH_CAPTIONS] or [1]
    k = max(fitting)
    if per_device_captions * k < GROUPED_MICRO_BATCH_MIN_CAPTIONS:
        larger = [d for d in divisors if per_device_captions * d >= GROUPED_MICRO_BATCH_MIN_CAPTIONS]
        if not larger:
            raise StepShapeError(
                f"--group_by_image True needs at least {GROUPED_MICRO_BATCH_MIN_CAPTIONS} captions a step on each "
                f"process (whole pictures have 5 to 7 captions), but BATCH_SIZE gives {per_device_captions} x "
                f"{accumulation} = {per_device_captions * accumulation} (PER_DEVICE_BATCH_SIZE x accumulation): "
                f"raise BATCH_SIZE to {GROUPED_MICRO_BATCH_MIN_CAPTIONS} or more captions a process, or train per "
                "caption"
            )
        k = min(larger)
    return per_device_captions * k, accumulation // k


def decide_step_shape(
    per_device_captions: int,
    processes: int,
    group_by_image: bool,
    global_batch_size: int | None = None,
    accumulation: int | None = None,
) -> StepShape:
    """The run's step. The launcher gives global_batch_size (its BATCH_SIZE) and the accumulation follows; a command
    line of its own may give the accumulation instead (transformers' --gradient_accumulation_steps), not both."""
    if per_device_captions < 1 or processes < 1:
        raise StepShapeError("PER_DEVICE_BATCH_SIZE and the number of processes must be at least 1")
    if global_batch_size is not None:
        derived = tutorial_accumulation(global_batch_size, per_device_captions, processes)
        if accumulation not in (None, 1, derived):
            raise StepShapeError(
                f"--global_batch_size {global_batch_size} gives {derived} micro-batches a step on {processes} "
                f"process(es), but --gradient_accumulation_steps {accumulation} is given too: give one of the two"
            )
        accumulation = derived
    accumulation = accumulation or 1
    if group_by_image:
        micro_batch, micro_batches = grouped_micro_batches(per_device_captions, accumulation)
    else:
        micro_batch, micro_batches = per_device_captions, accumulation
    return StepShape(per_device_captions, accumulation, micro_batch, micro_batches)
