"""Fine-tune InternVL2 (full or LoRA) on chat-format jsonl data: the torchrun target of the shell launchers.

  torchrun --nproc_per_node=8 internvl_chat/train/internvl_chat_finetune.py --model_name_or_path ... \
      --meta_path shell/data/coco_caption.json --output_dir work_dirs/... --use_llm_lora 128 ...

The steps are the original script's: tokenizer (+ InternVL tokens), model in bf16, config updates from the
command line, freezing, LoRA wrapping, datasets, Trainer. On top: resume from the last complete checkpoint,
throughput/MFU logging, the fine-tune's tiling settings kept in the saved config.
"""
import logging
import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import set_seed  # noqa: E402

from internvl_chat.data.collator import concat_pad_data_collator, image_grouping_collator, packed_collator  # noqa: E402
from internvl_chat.data.dataset import build_datasets, image_groups  # noqa: E402
from internvl_chat.data.preprocess import ConversationTokenizer  # noqa: E402
from internvl_chat.model.configuration_internvl_chat import InternVLChatConfig  # noqa: E402
from internvl_chat.model.conversation import IMG_CONTEXT_TOKEN, INTERNVL_ADDED_TOKENS  # noqa: E402
from internvl_chat.model.loader import check_checkpoint_folder, load_tokenizer  # noqa: E402
from internvl_chat.model.modeling_internvl_chat import (InternVLChatModel, block_mask_attention,  # noqa: E402
                                                         packed_attention)
from internvl_chat.train.arguments import parse_args  # noqa: E402
from internvl_chat.train.flops import FlopModel, peak_tflops  # noqa: E402
from internvl_chat.train.profiling import StepProfiler, parse_step_range  # noqa: E402
from internvl_chat.train.trainer import InternVLTrainer, last_complete_checkpoint  # noqa: E402

logger = logging.getLogger("internvl_chat.train")


def setup_logging(training_args):
    # INFO on the main process (the tutorial's "Num examples ... Total optimization steps" lines), WARNING elsewhere
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    logging.getLogger("internvl_chat").setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def init_deepspeed_comm(training_args) -> None:
    """On the CPU path (--use_cpu) transformers sets up torch.distributed but not DeepSpeed's communicator,
    so ZeRO-3's partitioned loading would see a world of 1; attach DeepSpeed to the existing process group."""
    if training_args.deepspeed and training_args.world_size > 1:
        import deepspeed

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else "nccl")


def freeze(module: torch.nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad = False


def load_model(model_args, data_args, training_args, tokenizer) -> InternVLChatModel:
    path = model_args.model_name_or_path
    config = InternVLChatConfig.from_pretrained(path)
    config.vision_config.drop_path_rate = model_args.drop_path_rate
    config.template = data_args.conv_style
    config.select_layer = model_args.vision_select_layer
    config.dynamic_image_size = data_args.dynamic_image_size
    config.use_thumbnail = data_args.use_thumbnail
    config.ps_version = model_args.ps_version
    config.min_dynamic_patch = data_args.min_dynamic_patch
    config.max_dynamic_patch = data_args.max_dynamic_patch
    # LoRA is wrapped below, after freezing, exactly as the original does; a checkpoint that already holds
    # adapters is loaded with them (continued LoRA training).
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    kwargs = {"config": config, "dtype": dtype}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    logger.info("Loading InternVLChatModel from %s (%s)", path, dtype)
    model = InternVLChatModel.from_pretrained(path, **kwargs)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if model.config.downsample_ratio != data_args.down_sample_ratio:
        raise ValueError(f"--down_sample_ratio {data_args.down_sample_ratio} differs from the checkpoint's "
                         f"downsample_ratio {model.config.downsample_ratio}")
    vision_size = model.config.vision_config.image_size
    if data_args.force_image_size != vision_size:
        logger.info("Resizing position embeddings from %d to %d", vision_size, data_args.force_image_size)
        model.vision_model.resize_pos_embeddings(vision_size, data_args.force_image_size,
                                                 model.config.vision_config.patch_size)
        model.config.force_image_size = data_args.force_image_size
        model.num_image_token = int((data_args.force_image_size // model.patch_size) ** 2
                                    * model.config.downsample_ratio ** 2)
    return model


def add_new_tokens(model, tokenizer, num_new_tokens: int) -> None:
    """Grow the embeddings for tokens the tokenizer lacked; new output rows start at the mean of the old."""
    if num_new_tokens <= 0:
        return
    model.language_model.resize_token_embeddings(len(tokenizer))
    output = model.language_model.get_output_embeddings().weight.data
    output[-num_new_tokens:] = output[:-num_new_tokens].mean(dim=0, keepdim=True)
    model.config.llm_config.vocab_size = len(tokenizer)
    model.language_model.config.vocab_size = len(tokenizer)


def use_block_mask_attention(model, requested: str | None) -> None:
    attention = block_mask_attention(requested)
    if requested and requested != attention:
        logger.warning("--attn_implementation %s cannot take the captions' block mask of --group_by_image: the "
                       "LLM uses %s (the ViT keeps %s)", requested, attention, requested)
    model.config.llm_config._attn_implementation = attention
    logger.info("Shared-image sequences: the LLM's attention is %s", attention)


def use_packed_attention(model, requested: str | None, device_type: str) -> None:
    attention = packed_attention(requested, device_type)
    model.config.llm_config._attn_implementation = attention
    logger.info("Packed samples: the LLM's attention is %s", attention)


def prepare_for_training(model, model_args) -> None:
    model.language_model.config.use_cache = False
    if model_args.grad_checkpoint:
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_args.freeze_backbone:
        freeze(model.vision_model)
    if model_args.freeze_llm:
        model.language_model = model.language_model.eval()
        freeze(model.language_model)
    if model_args.unfreeze_lm_head:
        for parameter in model.language_model.get_output_embeddings().parameters():
            parameter.requires_grad = True
    if model_args.use_backbone_lora and not model.config.use_backbone_lora:
        model.wrap_backbone_lora(r=model_args.use_backbone_lora, lora_alpha=2 * model_args.use_backbone_lora,
                                 lora_dropout=model_args.lora_dropout)
        model.config.use_backbone_lora = model_args.use_backbone_lora
    if model_args.use_llm_lora and not model.config.use_llm_lora:
        model.wrap_llm_lora(r=model_args.use_llm_lora, lora_alpha=2 * model_args.use_llm_lora,
                            lora_dropout=model_args.lora_dropout)
        model.config.use_llm_lora = model_args.use_llm_lora
    elif model.config.use_llm_lora:  # adapters loaded with the checkpoint: keep training them
        for name, parameter in model.language_model.named_parameters():
            if "lora_" in name:
                parameter.requires_grad = True
    if model_args.freeze_mlp:
        freeze(model.mlp1)
    if model_args.unfreeze_vit_layers:
        for parameter in model.vision_model.encoder.layers[model_args.unfreeze_vit_layers:].parameters():
            parameter.requires_grad = True


def resolve_meta(meta_path: str, data_root: str | None) -> str:
    """With --data_root, the meta file's relative paths are taken relative to that folder."""
    if not data_root:
        return meta_path
    import json
    import tempfile

    meta = json.loads(Path(meta_path).read_text())
    for entry in meta.values():
        for key in ("root", "annotation"):
            if not Path(entry[key]).is_absolute():
                entry[key] = str(Path(data_root) / entry[key])
    handle = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    handle.write(json.dumps(meta))
    handle.close()
    return handle.name


def main(argv: list[str]) -> None:
    model_args, data_args, training_args, run_args = parse_args(argv)
    setup_logging(training_args)
    if not model_args.model_name_or_path or not data_args.meta_path:
        raise SystemExit("--model_name_or_path and --meta_path are required")
    try:
        profile_range = parse_step_range(run_args.profile_steps) if run_args.profile_steps else None
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if data_args.pack_samples and data_args.group_by_image:
        raise SystemExit("--pack_samples and --group_by_image are two ways to batch the same captions: choose one")
    if data_args.pad_to_multiple_of < 1:
        raise SystemExit(f"--pad_to_multiple_of must be 1 or more (1: pad to the longest sample), got "
                         f"{data_args.pad_to_multiple_of}")
    for unsupported in ("vision_path", "llm_path", "mlp_path"):
        if getattr(model_args, unsupported):
            raise SystemExit(f"--{unsupported} is not supported: start from a complete InternVL2 checkpoint")
    check_checkpoint_folder(model_args.model_name_or_path)
    init_deepspeed_comm(training_args)
    logger.warning("rank %d/%d, device %s, bf16 %s, distributed %s", training_args.process_index,
                   training_args.world_size, training_args.device, training_args.bf16,
                   training_args.parallel_mode.value)

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
    model = load_model(model_args, data_args, training_args, tokenizer)
    add_new_tokens(model, tokenizer, num_new_tokens)
    prepare_for_training(model, model_args)
    if run_args.compile_blocks:
        logger.info("torch.compile: %d transformer blocks (compiled on first use)", model.compile_blocks())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Trainable parameters: %s of %s", f"{trainable:,}", f"{sum(p.numel() for p in model.parameters()):,}")
    if trainable == 0:
        raise SystemExit("nothing to train: every parameter is frozen (use --use_llm_lora or unfreeze a part)")

    encoder = ConversationTokenizer(tokenizer, data_args.conv_style, model.num_image_token, data_args.max_seq_length)
    dataset = build_datasets(
        resolve_meta(data_args.meta_path, data_args.data_root), encoder,
        image_size=data_args.force_image_size, dynamic_image_size=data_args.dynamic_image_size,
        use_thumbnail=data_args.use_thumbnail, min_dynamic_patch=data_args.min_dynamic_patch,
        max_dynamic_patch=data_args.max_dynamic_patch, normalize_type=data_args.normalize_type,
        seed=training_args.seed, strict=data_args.strict_data,
    )
    lengths, groups = None, None
    collator = partial(concat_pad_data_collator, length_multiple=data_args.pad_to_multiple_of)
    if data_args.group_by_image:
        groups, collator = image_groups(dataset), image_grouping_collator
        logger.info("Grouping captions by picture: %d pictures, %d captions", len(groups), len(dataset))
        use_block_mask_attention(model, model_args.attn_implementation)
    else:
        if data_args.pack_samples:
            collator = packed_collator
            use_packed_attention(model, model_args.attn_implementation, training_args.device.type)
        if data_args.group_by_length:
            lengths = [n for part in dataset.datasets for n in part.estimated_lengths()]

    flop_model = FlopModel.from_config(model.config, lora_rank=model_args.use_llm_lora,
                                       llm_trainable=not model_args.freeze_llm and not model_args.use_llm_lora,
                                       last_layer_at_logits=model.llm_takes_output_rows())
    peak = run_args.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None)
    training_args.remove_unused_columns = False  # every item key is a forward argument
    set_seed(training_args.seed)
    trainer = InternVLTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
        data_collator=collator, lengths=lengths, flop_model=flop_model, peak_tflops=peak,
        supervised_logits_only=run_args.supervised_logits_only, image_groups=groups,
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
        logger.warning("%d bad samples were skipped in the main process (workers log their own)", skipped)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Tear the process group down before interpreter exit: left to static destructors, a rank's backend
        # threads were once seen to abort the process ("terminate called without an active exception") after a
        # complete run.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
