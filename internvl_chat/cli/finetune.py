"""Fine-tune InternVL2 (full or LoRA) on chat-format jsonl data: the torchrun target of the shell launchers.

  torchrun --nproc_per_node=8 -m internvl_chat.cli.finetune --model_name_or_path ... \
      --meta_path shell/data/coco_caption.json --output_dir work_dirs/... --use_llm_lora 128 ...
  internvl-finetune --help

The steps are the original script's: tokenizer (+ InternVL tokens), model in bf16, config updates from the
command line, freezing, LoRA wrapping, datasets, Trainer. On top: resume from the last complete checkpoint,
throughput/MFU logging, the fine-tune's tiling settings kept in the saved config.
"""

import dataclasses
import json
import logging
import os
import sys

import torch
from transformers import set_seed

from internvl_chat.checkpoint.folder import CheckpointError, check_checkpoint_folder
from internvl_chat.checkpoint.loader import load_tokenizer
from internvl_chat.data.dataset import build_datasets
from internvl_chat.data.formats import MetaError
from internvl_chat.data.preprocess import (
    ConversationTokenizer,
    SampleError,
)
from internvl_chat.data.transforms import ImageError
from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig
from internvl_chat.model.conversation import INTERNVL_ADDED_TOKENS
from internvl_chat.train.arguments import ArgumentError, checkpoint_fact_problems, parse_args
from internvl_chat.train.batch_layout import BatchLayout
from internvl_chat.train.flops import FlopModel, peak_tflops
from internvl_chat.train.model_setup import (
    add_new_tokens,
    compile_blocks,
    compute_dtype,
    load_model,
    prepare_for_training,
)
from internvl_chat.train.profiling import StepProfiler, parse_step_range
from internvl_chat.train.run_logging import announce_deepspeed_build, quiet_stdout, setup_logging
from internvl_chat.train.step_shape import StepShapeError, decide_step_shape
from internvl_chat.train.trainer import InternVLTrainer, last_complete_checkpoint

logger = logging.getLogger("internvl_chat.train")


def init_deepspeed_comm(training_args, verbose: bool) -> None:
    """On the CPU path (--use_cpu) transformers sets up torch.distributed but not DeepSpeed's communicator,
    so ZeRO-3's partitioned loading would see a world of 1; attach DeepSpeed to the existing process group."""
    if training_args.deepspeed and training_args.world_size > 1:
        import deepspeed

        if not deepspeed.comm.is_initialized():
            with quiet_stdout(verbose):
                deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else "nccl")


def train(argv: list[str]) -> None:
    arguments = parse_args(argv)
    model_args, data_args, fast_args, training_args, run_args = arguments[:5]
    step = decide_step_shape(
        training_args.per_device_train_batch_size,
        training_args.world_size,
        fast_args.group_by_image,
        global_batch_size=run_args.global_batch_size,
        accumulation=training_args.gradient_accumulation_steps,
    )
    if (step.micro_batch, step.micro_batches) != (
        training_args.per_device_train_batch_size,
        training_args.gradient_accumulation_steps,
    ):
        # before the Trainer and DeepSpeed read the shape (dataclasses.replace runs TrainingArguments' set-up again)
        training_args = dataclasses.replace(
            training_args, per_device_train_batch_size=step.micro_batch, gradient_accumulation_steps=step.micro_batches
        )
    layout = BatchLayout.from_arguments(model_args, data_args, fast_args, step)
    setup_logging(training_args.should_log, run_args.verbose)
    if not run_args.verbose:
        training_args.disable_tqdm = True  # one line a logging step instead (run_logging.StepLine)
    if not model_args.model_name_or_path or not data_args.meta_path:
        raise SystemExit("--model_name_or_path and --meta_path are required")
    try:
        profile_range = parse_step_range(run_args.profile_steps) if run_args.profile_steps else None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    folder = check_checkpoint_folder(model_args.model_name_or_path)
    problems = checkpoint_fact_problems(
        arguments.checkpoint_facts, json.loads((folder / "config.json").read_text()), folder / "config.json"
    )
    if problems:
        raise ArgumentError("; ".join(problems))
    checkpoint_config = InternVLChatConfig.from_pretrained(model_args.model_name_or_path)
    if data_args.max_dynamic_patch is None:
        data_args.max_dynamic_patch = checkpoint_config.max_dynamic_patch
    announce_deepspeed_build(training_args)
    init_deepspeed_comm(training_args, run_args.verbose)
    logger.info(
        "%d process(es) on %s, %s",
        training_args.world_size,
        training_args.device.type,
        "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
    )

    resume = training_args.resume_from_checkpoint
    if resume is None and run_args.auto_resume:
        found = last_complete_checkpoint(training_args.output_dir)
        if found is not None:
            logger.info("Resuming from the last complete checkpoint %s", found)
            resume = str(found)
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args.model_name_or_path)
    tokenizer.model_max_length = data_args.max_seq_length
    num_new_tokens = tokenizer.add_tokens(list(INTERNVL_ADDED_TOKENS), special_tokens=True)
    # the data before the model: a bad annotation file stops the run in seconds, not after a model load
    checkpoint_config.force_image_size = data_args.force_image_size  # the tile size the run trains at
    encoder = ConversationTokenizer(
        tokenizer, checkpoint_config.template, checkpoint_config.num_image_token, data_args.max_seq_length
    )
    dataset = build_datasets(
        data_args.meta_path,
        encoder,
        data_root=data_args.data_root,
        image_size=data_args.force_image_size,
        dynamic_image_size=data_args.dynamic_image_size,
        use_thumbnail=data_args.use_thumbnail,
        min_dynamic_patch=data_args.min_dynamic_patch,
        max_dynamic_patch=data_args.max_dynamic_patch,
        normalize_type=data_args.normalize_type,
        seed=training_args.seed,
        strict=data_args.strict_data,
        show_progress=training_args.should_log,
    )
    model = load_model(model_args, data_args, compute_dtype(training_args), tokenizer, layout.attn_implementation())
    add_new_tokens(model, tokenizer, num_new_tokens)
    prepare_for_training(model, model_args)
    if fast_args.compile_blocks:
        logger.info("torch.compile: %d transformer blocks (compiled on first use)", compile_blocks(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Trainable parameters: %s of %s", f"{trainable:,}", f"{sum(p.numel() for p in model.parameters()):,}")
    if trainable == 0:
        raise SystemExit("nothing to train: every parameter is frozen (use --use_llm_lora or unfreeze a part)")

    logger.info("Batches: %s; the LLM's attention: %s", layout.describe(), model.config.llm_config._attn_implementation)
    logger.info("Steps: %s", layout.step_summary(dataset, training_args.world_size, training_args.seed))
    lengths = [n for part in dataset.datasets for n in part.estimated_lengths()] if layout.group_by_length else None

    flop_model = FlopModel.from_config(
        model.config,
        lora_rank=model_args.use_llm_lora,
        llm_trainable=not model_args.freeze_llm and not model_args.use_llm_lora,
        last_layer_at_logits=layout.computes_last_layer_at_rows(model),
    )
    peak = run_args.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None)
    if peak is None:
        logger.info(
            "MFU is not logged: no peak FLOP rate is known for %s (TFLOP/s is); --peak_tflops sets one",
            torch.cuda.get_device_name() if torch.cuda.is_available() else "a CPU",
        )
    training_args.remove_unused_columns = False  # every item key is a forward argument
    set_seed(training_args.seed)
    trainer = InternVLTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        layout=layout,
        lengths=lengths,
        flop_model=flop_model,
        peak_tflops=peak,
        verbose=run_args.verbose,
    )
    if profile_range:
        trainer.add_callback(StepProfiler(*profile_range, training_args.output_dir))
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    skipped = sum(part.skipped for part in dataset.datasets)
    if skipped:
        logger.warning("%d bad lines were skipped (the main process's count; see the warnings above)", skipped)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Tear the process group down before interpreter exit: left to static destructors, a rank's backend
        # threads were once seen to abort the process ("terminate called without an active exception") after a
        # complete run.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_without_teardown() -> None:
    """End a finished torchrun worker here, everything written and flushed: left to the interpreter's teardown,
    a worker of a complete multi-process run was seen to abort in static destructors ("terminate called without an
    active exception", exit 134) after the process group was destroyed, which reports a finished run as failed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    try:
        train(sys.argv[1:] if argv is None else argv)
        if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            exit_without_teardown()
    except (ArgumentError, CheckpointError, MetaError, SampleError, ImageError, StepShapeError) as error:
        # a mistake in the inputs: the message names the file and the fix, a traceback would only bury it
        rank = os.environ.get("RANK")
        print(f"internvl-finetune{f' (process {rank})' if rank else ''}: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
