"""The Trainer of the fine-tuning recipe: transformers' Trainer plus the original's length-grouped sampler,
throughput and MFU logging, and checkpoints that are only resumed from when complete."""

import gc
import json
import logging
import math
import re
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import PrinterCallback, Trainer, TrainerCallback
from transformers.trainer_utils import seed_worker

from ..checkpoint.serving_files import complete_checkpoint_files
from ..data.dataset import ImageGroupedDataset
from .batch import TrainingBatch
from .batch_layout import BatchLayout
from .flops import FlopModel
from .model_setup import compute_dtype
from .run_logging import StepLine
from .step import backward_micro_batch, weigh_step

logger = logging.getLogger("internvl_chat.train")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class GarbageCollectionTimer:
    """Time that Python's cyclic garbage collector holds the training process, counted from gc's own callbacks.
    A full collection walks every object the process holds, and one that has compiled graphs holds millions: the
    host then queues no kernels while the GPU drains its queue. Logged per window as `python_gc_ms` and
    `python_gc_full` (full collections)."""

    def __init__(self):
        self.seconds, self.full_collections, self._start = 0.0, 0, None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.full_collections += info["generation"] == 2  # the oldest generation: every tracked object
            self._start = None

    def __enter__(self) -> "GarbageCollectionTimer":
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self)

    def take(self) -> dict:
        """The window's figures, and a new window."""
        figures = {"python_gc_ms": round(self.seconds * 1e3, 1), "python_gc_full": self.full_collections}
        self.seconds, self.full_collections = 0.0, 0
        return figures


class FreezeObjectsAfterCompiling(TrainerCallback):
    """After this process's first optimizer steps, where torch.compile builds its graphs (the first shape, then the
    dynamic-shape graphs at the second), every object alive is taken out of the garbage collector's walks
    (gc.freeze). A full collection otherwise walks them all, for hundreds of milliseconds once graphs are compiled,
    while the GPU's queue runs dry, and every rank at its own times. Objects
    made later are collected as usual; the frozen ones are released to the collector when training ends."""

    def __init__(self, after_steps: int = 2):
        self.after_steps, self.steps = after_steps, 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if self.steps == self.after_steps:
            gc.collect()
            gc.freeze()
            logger.debug(
                "Python's garbage collector: the %d objects alive after the first %d steps frozen (gc.freeze)",
                gc.get_freeze_count(),
                self.after_steps,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.steps >= self.after_steps:
            gc.unfreeze()


class SamplerEpochs(TrainerCallback):
    """Puts the run's own sampler (length-grouped, or grouped by image) on the epoch the training loop is in; each
    epoch's order is a function of the seed and the epoch. transformers sets a sampler's epoch through the loader's
    wrappers, but a resumed run's first epoch is a skip_first_batches loader, whose extra wrapper the call does not
    pass: the sampler would draw epoch 0's order in any epoch a run resumes in. The epoch is counted as the
    training loop counts it: a resumed run starts in epoch global_step // steps an epoch."""

    def __init__(self, trainer: "InternVLTrainer"):
        self.trainer, self.epoch = trainer, 0

    def on_train_begin(self, args, state, control, **kwargs):
        per_epoch = self.trainer.update_steps_per_epoch
        self.epoch = state.global_step // per_epoch if per_epoch else 0
        if state.global_step:
            done = state.global_step - self.epoch * per_epoch
            logger.info(
                "Resumed at step %d of %d: epoch %d (counted from 0), whose first %d optimizer step(s) (%d "
                "micro-batches a process) are skipped; weights, optimizer, schedule and every process's random "
                "states as saved",
                state.global_step,
                state.max_steps,
                self.epoch,
                done,
                done * args.gradient_accumulation_steps,
            )

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = self.trainer.epoch_sampler
        if sampler is not None:
            sampler.set_epoch(self.epoch)
        self.epoch += 1


COMPLETE_MARKER = "checkpoint_complete.json"


class CompleteCheckpoints(TrainerCallback):
    """Marks a checkpoint complete once every process has written its part, and only then rotates the older ones out.

    transformers' main process writes trainer_state.json after its own files, without waiting for the others' (their
    random states, their DeepSpeed optimizer shards), and removes the older checkpoints beyond --save_total_limit in
    the same breath: a run killed then leaves a checkpoint that looks complete but resumes with another rank's random
    state missing. Here, after every process's save (on_save), a barrier; then the main process writes
    COMPLETE_MARKER and removes the checkpoints older than the newest `keep` complete ones (the trainer takes
    save_total_limit over from transformers)."""

    def __init__(self, trainer: "InternVLTrainer", keep: int | None):
        self.trainer, self.keep = trainer, keep

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.trainer.accelerator.wait_for_everyone()
        if not args.should_save or not folder.is_dir():
            return
        marker = {"global_step": state.global_step, "processes": args.world_size}
        (folder / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        if self.keep:
            complete = [path for _, path in checkpoints(args.output_dir) if is_complete_checkpoint(path)]
            newest_kept = complete[: self.keep]
            for _, path in checkpoints(args.output_dir):
                if path not in newest_kept and path != folder:
                    shutil.rmtree(path, ignore_errors=True)
                    logger.debug("Removed %s (--save_total_limit %d)", path, self.keep)


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-* folder, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted(
        ((int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))),
        reverse=True,
    )


def is_complete_checkpoint(folder: Path) -> bool:
    """Every process's files written (COMPLETE_MARKER, CompleteCheckpoints) and the trainer state readable."""
    try:
        json.loads((folder / COMPLETE_MARKER).read_text())
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    return next((folder for _, folder in checkpoints(output_dir) if is_complete_checkpoint(folder)), None)


class InternVLTrainer(Trainer):
    """transformers' Trainer with the run's BatchLayout (sampler, collator, model inputs), throughput, FLOP and MFU
    logging, and the original's step count for epoch-based runs."""

    def __init__(
        self,
        *args,
        layout: BatchLayout | None = None,
        lengths: list[int] | None = None,
        flop_model: FlopModel | None = None,
        peak_tflops: float | None = None,
        verbose: bool = False,
        **kwargs,
    ):
        self.verbose = verbose  # read by create_accelerator_and_postprocess, which the base __init__ calls
        super().__init__(*args, **kwargs)
        if self.args.disable_tqdm:  # one line a logging step instead of transformers' printed dict
            self.remove_callback(PrinterCallback)
            self.add_callback(StepLine())
        self.layout = layout or BatchLayout()
        # the launcher loads the model in bf16 / fp16 with --bf16 / --fp16 (train/model_setup.py)
        self.data_collator = self.layout.collator(compute_dtype(self.args))
        self.lengths = lengths
        self.flop_model = flop_model
        self.peak_tflops = peak_tflops
        self._window = {"samples": 0, "tokens": 0, "flops": 0.0}
        self._window_start = None
        self._micro_step_flops = 0.0
        self.gc_timer = GarbageCollectionTimer()
        self.add_callback(FreezeObjectsAfterCompiling())
        self.epoch_sampler = None  # the sampler of the run's own order, if any (SamplerEpochs)
        self.update_steps_per_epoch = None  # as the training loop counts them (set_initial_training_values)
        self.add_callback(SamplerEpochs(self))
        if not self.args.load_best_model_at_end:  # the best checkpoint's protection stays with transformers
            self.add_callback(CompleteCheckpoints(self, self.args.save_total_limit))
            self.args.save_total_limit = None
        # transformers' loop replaces a non-finite micro-step loss by the mean of the window so far, but decides so
        # on the host, a wait for every micro-step's last kernel before the next one can be queued. training_step
        # makes the same replacement on the device instead, from its own sum of the window's losses (reset when a
        # loss is logged), and the loop's own check is turned off.
        self.filter_nan_inf_losses = self.args.logging_nan_inf_filter
        self.args.logging_nan_inf_filter = False
        self.loss_window_sum = None  # the micro-step losses returned since the last logged loss, on the device
        self.loss_window_start = None  # the optimizer step that window began at

    def create_accelerator_and_postprocess(self) -> None:
        # Batches go to the GPU asynchronously from the loader's pinned memory. accelerate copies them
        # synchronously by default, so that every fetch waits for the GPU's queue to drain, and the Trainer
        # fetches an optimizer step's micro-batches together.
        if self.args.dataloader_pin_memory and torch.cuda.is_available() and not self.args.use_cpu:
            self.args.accelerator_config.non_blocking = True
        deepspeed_config = getattr(self.args, "hf_deepspeed_config", None)
        if deepspeed_config is not None:
            # DeepSpeed's throughput timer synchronizes the GPU at every micro-step's forward and step (twice a
            # micro-step, each draining the GPU's queue) to report samples/s every steps_per_print steps; this
            # Trainer logs throughput itself. A config that sets the timer's own values keeps them.
            timer = deepspeed_config.config.setdefault("timers", {}).setdefault("throughput", {})
            timer.setdefault("synchronized", False)
            if not self.verbose:
                # the original configs ask for DeepSpeed's wall-clock breakdown: several lines every step
                deepspeed_config.config["wall_clock_breakdown"] = False
            optimizer = deepspeed_config.config.get("optimizer", {})
            if self.args.use_cpu and optimizer.get("type", "").lower() in ("adam", "adamw"):
                # DeepSpeed's Adam on the CPU (a C++ op) keeps beta^t as a running product, which a resumed run
                # starts again from pow(beta, step): its weights would differ in the last bit from the first step
                # after a resume. PyTorch's AdamW takes beta^t from the step count every step (and needs no build).
                optimizer.setdefault("params", {}).setdefault("torch_adam", True)
        super().create_accelerator_and_postprocess()

    def train(self, *args, **kwargs):
        with self.gc_timer:
            return super().train(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        world = self.args.world_size * self.args.gradient_accumulation_steps
        sampler = None
        if self.lengths is not None:
            sampler = self.layout.sampler(self.lengths, self.args.train_batch_size, world, self.args.seed)
            self.epoch_sampler = sampler
        return sampler or super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self):
        """Grouped by image, micro-batches of whole pictures with all their captions, each picture loaded once, the
        tutorial's captions a step (ImageGroupedBatchSampler); accelerate deals them out to the ranks."""
        if not self.layout.group_by_image:
            return super().get_train_dataloader()
        sampler = self.layout.batch_sampler(self.train_dataset, self.args.world_size, self.args.seed)
        self.epoch_sampler = sampler
        loader = DataLoader(
            ImageGroupedDataset(self.train_dataset),
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        return self.accelerator.prepare(loader)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """An optimizer step's micro-batches, fetched together by the training loop, weighed for the step
        (step.weigh_step); grouped by image the weights need the step's captions on all ranks. The model computes
        its own loss, so there is no item count for the loop to pass on."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if self.layout.group_by_image and batches:
            step_captions = sum(batch.counts.captions for batch in batches)  # this rank's, on the host
            if self.args.world_size > 1:  # all ranks', summed on the device: the host does not wait for the GPU
                step_captions = self.accelerator.reduce(
                    torch.tensor(float(step_captions), device=device), reduction="sum"
                )
            batches = weigh_step(batches, self.layout, step_captions, self.args.world_size)
        return batches, None

    def set_initial_training_values(self, args, dataloader):
        """Epoch-based runs take the original's step count: whole accumulation windows only (566,747 COCO
        captions at 8 x 4 x 16 give 1106 steps; transformers 5 would round the last partial window up to 1107).
        The warmup and cosine schedule follow from it, as in the tutorial."""
        values = list(super().set_initial_training_values(args, dataloader))
        if args.max_steps <= 0 and dataloader is not None and len(dataloader):
            per_epoch = max(len(dataloader) // args.gradient_accumulation_steps, 1)
            values[1] = per_epoch
            values[-1] = math.ceil(args.num_train_epochs * per_epoch)
        self.update_steps_per_epoch = values[1]
        return tuple(values)

    def training_step(self, model, inputs: TrainingBatch, num_items_in_batch=None):
        """One micro-batch through the recipe's step (step.backward_micro_batch), the loss backward through accelerate
        (and DeepSpeed, which is told that the loss is already divided by the step's micro-batches)."""
        if self._window_start is None:
            self._window_start = time.perf_counter()
        counts = inputs.counts
        self._window["samples"] += counts.captions
        self._window["tokens"] += sum(counts.lengths)
        if self.flop_model is not None:
            self._micro_step_flops = self.flop_model.batch_flops(inputs, self.layout.uses_loss_rows)
            self._window["flops"] += self._micro_step_flops
        model.train()
        backward_kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}
        loss = backward_micro_batch(
            model,
            inputs,
            self.layout,
            self.current_gradient_accumulation_steps,
            lambda loss: self.accelerator.backward(loss, **backward_kwargs),
            self.compute_loss_context_manager,
        )
        if self.loss_window_sum is None:
            self.loss_window_sum = torch.zeros((), dtype=loss.dtype, device=loss.device)
            self.loss_window_start = self.state.global_step
        if self.filter_nan_inf_losses:  # the loop's replacement, without a host read
            window_mean = self.loss_window_sum / (1 + self.state.global_step - self.loss_window_start)
            loss = torch.where(torch.isfinite(loss), loss, window_mean)
        self.loss_window_sum += loss.detach()
        return loss

    def floating_point_ops(self, inputs: TrainingBatch) -> float:
        """The micro-step's FLOPs for trainer_state's total_flos, from the FLOP model; without one, transformers'
        estimate (6 x tokens x parameters)."""
        if self.flop_model is None:
            return 6 * inputs.input_ids.numel() * self.model.num_parameters(exclude_embeddings=True)
        return self._micro_step_flops

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The model and tokenizer as transformers saves them, then what the original checkpoints carry beside them
        for serving engines (checkpoint/serving_files.py): every checkpoint and the run's output folder."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            complete_checkpoint_files(output_dir or self.args.output_dir, self.processing_class)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self.loss_window_sum is not None:
            self.loss_window_sum.zero_()
            self.loss_window_start = self.state.global_step
        if "loss" in logs and self._window_start is not None:
            counts = torch.tensor(
                [self._window["samples"], self._window["tokens"], self._window["flops"]],
                dtype=torch.float64,
                device=self.args.device,
            )
            counts = self.accelerator.reduce(counts, reduction="sum")
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            samples, tokens, flops = counts.tolist()
            logs["samples_per_second"] = round(samples / elapsed, 3)
            logs["tokens_per_second"] = round(tokens / elapsed, 1)
            if self.flop_model is not None:
                logs["tflops_per_device"] = round(flops / elapsed / self.args.world_size / 1e12, 2)
                if self.peak_tflops:
                    logs["mfu"] = round(logs["tflops_per_device"] / self.peak_tflops, 4)
            logs.update(self.gc_timer.take())
            if torch.cuda.is_available():
                logs["max_memory_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            self._window = {"samples": 0, "tokens": 0, "flops": 0.0}
            self._window_start = time.perf_counter()
        logs = {key: value for key, value in logs.items() if not (isinstance(value, float) and math.isnan(value))}
        super().log(logs, start_time)
