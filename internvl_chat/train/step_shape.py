"""How the launcher's step becomes micro-batches grouped by image: the tutorial's captions a step (per-device batch x
accumulation on each rank) in fewer, larger micro-batches of whole pictures. Without torch, so that the launcher
checks it before torchrun starts (train/preflight.py) with the rule the run uses (BatchLayout.trainer_step_shape)."""

# A grouped micro-batch holds up to this many captions (about 4 pictures): about the tokens of the tutorial's
# micro-batch of 4 captions (4 x ~1,850), since the pictures' prompts are not repeated.
GROUPED_MICRO_BATCH_CAPTIONS = 20
# ... and at least this many, so that a micro-batch has room for the largest COCO pictures' captions.
GROUPED_MICRO_BATCH_MIN_CAPTIONS = 8


class StepShapeError(ValueError):
    pass


def grouped_step_shape(per_device_captions: int, accumulation: int) -> tuple[int, int]:
    """(per_device_train_batch_size, gradient_accumulation_steps) grouped by image: the accumulation divided by the
    largest of its divisors k that keeps a micro-batch's caption budget (k x per-device batch) within
    GROUPED_MICRO_BATCH_CAPTIONS, and the per-device batch multiplied by it; the product, and so the global batch, is
    the tutorial's."""
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
