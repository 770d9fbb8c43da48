"""Fine-tune InternVL2 (full or LoRA) on chat-format jsonl data: the torchrun target of the shell launchers.

  torchrun --nproc_per_node=8 internvl_chat/train/internvl_chat_finetune.py --model_name_or_path ... \
      --meta_path shell/data/coco_caption.json --output_dir work_dirs/... --use_llm_lora 128 ...

The steps are the original script's: tokenizer (+ InternVL tokens), model in bf16, config updates from the
command line, freezing, LoRA wrapping, datasets, Trainer. On top: resume from the last complete checkpoint,
throughput/MFU logging, the fine-tune's tiling settings kept in the saved config.
"""

import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402

from internvl_chat.data.dataset import build_datasets  # noqa: E402
from internvl_chat.data.meta import MetaError  # noqa: E402
from internvl_chat.data.preprocess import (
    ConversationTokenizer,  # noqa: E402
    SampleError,  # noqa: E402
)
from internvl_chat.data.transforms import ImageError  # noqa: E402
from internvl_chat.model.checkpoint_folder import CheckpointError, check_checkpoint_folder  # noqa: E402
from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig  # noqa: E402
from internvl_chat.model.conversation import INTERNVL_ADDED_TOKENS  # noqa: E402
from internvl_chat.model.loader import load_tokenizer  # noqa: E402
from internvl_chat.train.arguments import parse_args  # noqa: E402
from internvl_chat.train.batch_layout import BatchLayout  # noqa: E402
from internvl_chat.train.flops import FlopModel, peak_tflops  # noqa: E402
from internvl_chat.train.model_setup import add_new_tokens, compile_blocks, load_model, prepare_for_training  # noqa: E402
from internvl_chat.train.profiling import StepProfiler, parse_step_range  # noqa: E402
from internvl_chat.train.run_logging import announce_deepspeed_build, quiet_stdout, setup_logging  # noqa: E402
from internvl_chat.train.step_shape import StepShapeError  # noqa: E402
from internvl_chat.train.trainer import InternVLTrainer, last_complete_checkpoint  # noqa: E402

logger = logging.getLogger("internvl_chat.train")


def init_deepspeed_comm(training_args, verbose: bool) -> None:
    """On the CPU path (--use_cpu) transformers sets up torch.distributed but not DeepSpeed's communicator,
    so ZeRO-3's partitioned loading would see a world of 1; attach DeepSpeed to the existing process group."""
    if training_args.deepspeed and training_args.world_size > 1:
        import deepspeed

        if not deepspeed.comm.is_initialized():
            with quiet_stdout(verbose):
                deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else "nccl")


def image_tokens_per_tile(data_args, config) -> int:
    """<IMG_CONTEXT> tokens a tile: (tile / patch)^2 patches, merged 1/downsample^2 to one by the pixel shuffle."""
    patches = (data_args.force_image_size // config.vision_config.patch_size) ** 2
    return int(patches * config.downsample_ratio**2)


def main(argv: list[str]) -> None:
    model_args, data_args, training_args, run_args = parse_args(argv)
    layout = BatchLayout.from_arguments(model_args, data_args, training_args, run_args)
    micro_batch, accumulation = layout.trainer_step_shape()
    if (micro_batch, accumulation) != (
        training_args.per_device_train_batch_size,
        training_args.gradient_accumulation_steps,
    ):
        # grouped by image: the tutorial's captions a step in fewer micro-batches of whole pictures; parsed again so
        # that transformers and DeepSpeed take the shape from the start (the global batch is unchanged)
        training_args = parse_args(
            [
                *argv,
                "--per_device_train_batch_size",
                str(micro_batch),
                "--gradient_accumulation_steps",
                str(accumulation),
            ]
        )[2]
    setup_logging(training_args.should_log, run_args.verbose)
    if not run_args.verbose:
        training_args.disable_tqdm = True  # one line a logging step instead (run_logging.StepLine)
    if not model_args.model_name_or_path or not data_args.meta_path:
        raise SystemExit("--model_name_or_path and --meta_path are required")
    try:
        profile_range = parse_step_range(run_args.profile_steps) if run_args.profile_steps else None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    check_checkpoint_folder(model_args.model_name_or_path)
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
    image_tokens = image_tokens_per_tile(data_args, checkpoint_config)
    encoder = ConversationTokenizer(tokenizer, data_args.conv_style, image_tokens, data_args.max_seq_length)
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
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    model = load_model(model_args, data_args, dtype, tokenizer, layout.attn_implementation())
    add_new_tokens(model, tokenizer, num_new_tokens)
    prepare_for_training(model, model_args)
    if run_args.compile_blocks:
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


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (CheckpointError, MetaError, SampleError, ImageError, StepShapeError) as error:
        # a mistake in the inputs: the message names the file and the fix, a traceback would only bury it
        rank = os.environ.get("RANK")
        print(f"internvl_chat_finetune{f' (process {rank})' if rank else ''}: {error}", file=sys.stderr)
        sys.exit(2)
