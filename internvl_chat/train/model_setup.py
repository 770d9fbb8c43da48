"""The model as the fine-tuning recipe trains it: loaded with the run's settings and attention, new tokens added,
parts frozen, LoRA wrapped, gradient checkpointing and compiled blocks as asked. The entry point and
tools/benchmark_train.py both set the model up through these functions."""

import logging

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ..model.configuration_internvl_chat import InternVLChatConfig
from ..model.conversation import IMG_CONTEXT_TOKEN
from ..model.modeling_internvl_chat import InternVLChatModel

logger = logging.getLogger("internvl_chat.train")


def compute_dtype(training_args) -> torch.dtype:
    """The dtype the model is loaded in and computes in, and the loader casts the pixels to: --bf16, --fp16, or fp32."""
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def load_model(model_args, data_args, dtype: torch.dtype, tokenizer, attn_implementation) -> InternVLChatModel:
    """The checkpoint with the fine-tune's settings written into its config (they are saved with the result)."""
    path = model_args.model_name_or_path
    config = InternVLChatConfig.from_pretrained(path)
    config.vision_config.drop_path_rate = model_args.drop_path_rate
    config.select_layer = model_args.vision_select_layer
    config.dynamic_image_size = data_args.dynamic_image_size
    config.use_thumbnail = data_args.use_thumbnail
    config.min_dynamic_patch = data_args.min_dynamic_patch
    config.max_dynamic_patch = data_args.max_dynamic_patch
    # LoRA is wrapped after freezing (prepare_for_training), exactly as the original does; a checkpoint that
    # already holds adapters is loaded with them (continued LoRA training).
    kwargs = {"config": config, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    logger.info("Loading InternVLChatModel from %s (%s)", path, dtype)
    model = InternVLChatModel.from_pretrained(path, **kwargs)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    vision_size = model.config.vision_config.image_size
    if data_args.force_image_size != vision_size:
        logger.info("Resizing position embeddings from %d to %d", vision_size, data_args.force_image_size)
        model.vision_model.resize_pos_embeddings(
            vision_size, data_args.force_image_size, model.config.vision_config.patch_size
        )
        model.config.force_image_size = data_args.force_image_size
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


def freeze(module: torch.nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad = False


def prepare_for_training(model, model_args) -> None:
    """The original's order: checkpointing, freezing, LoRA on the ViT and the LLM, the projector, ViT layers."""
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
        model.wrap_backbone_lora(r=model_args.use_backbone_lora, lora_dropout=model_args.lora_dropout)
        model.config.use_backbone_lora = model_args.use_backbone_lora
    if model_args.use_llm_lora and not model.config.use_llm_lora:
        model.wrap_llm_lora(r=model_args.use_llm_lora, lora_dropout=model_args.lora_dropout)
        model.config.use_llm_lora = model_args.use_llm_lora
    elif model.config.use_llm_lora:  # adapters loaded with the checkpoint: keep training them
        for name, parameter in model.language_model.named_parameters():
            if "lora_" in name:
                parameter.requires_grad = True
    if model_args.freeze_mlp:
        freeze(model.mlp1)
    if model_args.unfreeze_vit_layers:
        for parameter in model.vision_model.encoder.layers[model_args.unfreeze_vit_layers :].parameters():
            parameter.requires_grad = True


def compile_blocks(model: torch.nn.Module, dynamic: bool = True) -> int:
    """torch.compile every transformer block (ViT layers and LLM decoder layers) in place; returns how many.
    Blocks rather than the whole model: the image scatter and mask building stay eager, one compiled graph serves
    all layers of a stack, and state_dict keys do not change. dynamic=True because sequence lengths change from
    batch to batch."""
    blocks = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    # Blocks of a stack share one compiled forward, but a per-block constant (e.g. each ViT layer's own
    # stochastic-depth rate) may add a guarded variant per block, and past the default limit of 8 variants the
    # later blocks would silently run uncompiled.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * len(blocks))
    for block in blocks:
        block.compile(dynamic=dynamic)
    return len(blocks)
