"""InternVLChatModel: InternViT -> pixel shuffle -> mlp1 -> an LLM, with image features written into the LLM's
input embeddings at the <IMG_CONTEXT> positions.

Attribute names are the original's (`vision_model`, `mlp1`, `language_model`), so they are also the checkpoint
key prefixes. LoRA adapters are wrapped in the constructor from `use_llm_lora` / `use_backbone_lora`, which is
what lets an unmerged LoRA training output load directly.

Attention is chosen once, when the model is built, through transformers' `attn_implementation`: a string for the
whole model, or a dict with `vision_config` / `llm_config` keys for the two halves. Where nothing is asked for,
each half takes flash_attention_2 if flash-attn imports, else sdpa (default_attn_implementation).
"""

import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GenerationConfig,
    LlamaForCausalLM,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import is_flash_attn_2_available

from .configuration_internvl_chat import InternVLChatConfig
from .conversation import IMG_CONTEXT_TOKEN, get_conv_template, image_placeholder, image_placeholder_collapsed
from .decoder_steps import decoder_steps_of
from .modeling_intern_vit import InternVisionModel
from .modeling_internlm2 import InternLM2ForCausalLM, causal_lm_loss

LLM_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}

# The original's LoRA targets per LLM family; PEFT matches them as module-name suffixes.
_SEPARATE_QKV_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj")  # fmt: skip
LLM_LORA_TARGETS = {
    "InternLM2ForCausalLM": ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    "Phi3ForCausalLM": ("mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"),
    "Qwen2ForCausalLM": _SEPARATE_QKV_TARGETS,
    "Qwen3ForCausalLM": _SEPARATE_QKV_TARGETS,  # the original has none (its 3.5 code lost LoRA): Qwen2's
    "LlamaForCausalLM": _SEPARATE_QKV_TARGETS,
}
BACKBONE_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def default_attn_implementation() -> str:
    """What a part of the model runs when no attention is asked for: flash attention where flash-attn imports (as
    the original does), else PyTorch's SDPA."""
    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


@dataclass
class LossRows:
    """The rows a loss reads, for forward(loss_rows=...): the LM head and the loss then run at these rows only.

    positions [B, R]: the positions t whose logits predict a supervised token t + 1, R slots per sequence (spare
    slots hold any position, with target -100); targets [B, R]: those tokens. mask [B, 1, R, L] (bool, True: may
    attend) is each slot's row of the attention mask; given it, the LLM computes its last layer at these rows only
    (its decoder steps' hidden_at_rows, model/decoder_steps.py), since nothing reads the others.

    weights [B, R]: the loss is the weighted sum of the rows' cross-entropies instead of their mean (a training
    batch that mixes the captions of several of a run's steps sets them)."""

    positions: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor | None = None
    weights: torch.Tensor | None = None


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
    """[N, R, C, D] patch grid -> [N, R*s, C*s, D/s^2] for s = scale_factor (0.5 merges 2x2 patches).

    Output token (i, j) holds the patches (s_i + dy, s_j + dx) concatenated with dy major, dx minor.
    v2 keeps tokens row-major; v1 (the config default, kept for old checkpoints) emits them column-major.
    """
    n, rows, cols, dim = x.shape
    step = int(round(1 / scale_factor))
    x = x.reshape(n, rows // step, step, cols // step, step, dim)
    if ps_version == "v1":
        x = x.permute(0, 3, 1, 2, 4, 5)  # (N, C/s, R/s, dy, dx, D)
    else:
        x = x.permute(0, 1, 3, 2, 4, 5)  # (N, R/s, C/s, dy, dx, D)
    return x.reshape(n, x.shape[1], x.shape[2], step * step * dim)


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    config: InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "InternVisionModel",
        "LlamaDecoderLayer",
        "InternLM2DecoderLayer",
        "Phi3DecoderLayer",
        "Qwen2DecoderLayer",
    ]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # forward() computes its own token-mean loss, so the Trainer must not divide it again by the items in the batch.
    accepts_loss_kwargs = False

    def __init__(self, config: InternVLChatConfig, vision_model=None, language_model=None, use_flash_attn=None):
        if use_flash_attn is not None:  # the original constructor's switch
            config._attn_implementation = "flash_attention_2" if use_flash_attn else "eager"
        for part in (config.vision_config, config.llm_config):
            if part._attn_implementation is None:
                part._attn_implementation = default_attn_implementation()
        config.vision_config.use_flash_attn = config.vision_config._attn_implementation == "flash_attention_2"
        super().__init__(config)

        vision_config = config.vision_config
        self.patch_size = vision_config.patch_size
        self.select_layer = config.select_layer
        self.template = config.template
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version

        arch = config.llm_config.architectures[0]
        if arch not in LLM_CLASSES:
            raise ValueError(f"Unsupported LLM architecture {arch!r}; expected one of {sorted(LLM_CLASSES)}")
        self.vision_model = vision_model if vision_model is not None else InternVisionModel(vision_config)
        self.language_model = language_model if language_model is not None else LLM_CLASSES[arch](config.llm_config)

        vit_hidden = vision_config.hidden_size
        llm_hidden = config.llm_config.hidden_size
        merged = vit_hidden * int(round(1 / config.downsample_ratio)) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(merged), nn.Linear(merged, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden)
        )

        self.img_context_token_id = None
        self.conv_template = get_conv_template(self.template)
        self.system_message = getattr(config, "system_message", self.conv_template.system_message)

        if config.use_backbone_lora:
            self.wrap_backbone_lora(r=config.use_backbone_lora)
        if config.use_llm_lora:
            self.wrap_llm_lora(r=config.use_llm_lora)
        self.post_init()

    @property
    def num_image_token(self) -> int:
        """<IMG_CONTEXT> tokens a tile (InternVLChatConfig.num_image_token)."""
        return self.config.num_image_token

    @property
    def base_language_model(self) -> PreTrainedModel:
        """The LLM itself: under LoRA, the model inside PEFT's wrapper (whose layers hold the adapters)."""
        llm = self.language_model
        return llm.get_base_model() if hasattr(llm, "get_base_model") else llm

    @property
    def decoder_steps(self):
        """The LLM's decoder-step interface (model/decoder_steps.py): prefill, decode_step and the rest for the fast
        caption engine, hidden_at_rows for the training fast modes; the same for every LLM family."""
        return decoder_steps_of(self.base_language_model)

    # ------------------------------------------------------------------ LoRA
    # The original's adapters: alpha twice the rank (so a rank-128 adapter scales by 2), dropout 0.05 on its input.
    def wrap_backbone_lora(self, r: int = 128, lora_alpha: int | None = None, lora_dropout: float = 0.05):
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=r, target_modules=list(BACKBONE_LORA_TARGETS), lora_alpha=lora_alpha or 2 * r, lora_dropout=lora_dropout
        )
        self.vision_model = get_peft_model(self.vision_model, lora_config)
        self.vision_model.print_trainable_parameters()

    def wrap_llm_lora(self, r: int = 128, lora_alpha: int | None = None, lora_dropout: float = 0.05):
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=r,
            target_modules=list(LLM_LORA_TARGETS[self.config.llm_config.architectures[0]]),
            lora_alpha=lora_alpha or 2 * r,
            lora_dropout=lora_dropout,
            task_type="CAUSAL_LM",
        )
        self.language_model = get_peft_model(self.language_model, lora_config)
        self.language_model.enable_input_require_grads()
        self.language_model.print_trainable_parameters()

    # ------------------------------------------------------------------ vision
    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        if self.ps_version == "v1":
            warnings.warn(
                "ps_version 'v1' keeps the merged patch grid transposed; InternVL2 checkpoints use 'v2'.", stacklevel=2
            )
        return pixel_shuffle(x, scale_factor, self.ps_version)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[T, 3, S, S] tiles -> [T, num_image_token, llm_hidden] LLM-space image embeddings."""
        if self.select_layer == -1:
            vit_embeds = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        else:
            outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
            vit_embeds = outputs.hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]  # drop CLS
        side = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    def embed_with_images(
        self, input_ids: torch.LongTensor, vit_embeds: torch.Tensor | None, strict: bool = True
    ) -> tuple[torch.Tensor, bool]:
        """Token embeddings with image features written at the <IMG_CONTEXT> positions, in row-major
        (sample, position) order. Returns (embeddings, counts_matched). With strict=False a count mismatch
        fills what it can and reports False, as the original training forward does (it then zeroes the loss)."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if vit_embeds is None:
            return embeds, True
        if self.img_context_token_id is None:
            raise ValueError(
                "img_context_token_id is not set: assign tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>') "
                "to model.img_context_token_id (chat() and batch_chat() do it themselves)"
            )
        rows, columns = (input_ids == self.img_context_token_id).nonzero(as_tuple=True)  # (sample, position) order
        features = vit_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        matched = rows.numel() == features.shape[0]
        if not matched:
            message = (
                f"{rows.numel()} <IMG_CONTEXT> tokens but {features.shape[0]} image features "
                f"({features.shape[0] // self.num_image_token} tiles x {self.num_image_token} tokens)"
            )
            if strict:
                raise ValueError(message)
            warnings.warn(message + "; the loss of this batch is zeroed", stacklevel=3)
            count = min(rows.numel(), features.shape[0])
            rows, columns, features = rows[:count], columns[:count], features[:count]
        # index_put keeps the features in the autograd graph (the original's `x * 0.0 + features`). Indexing the
        # [B, L, H] tensor itself, not a flattened view, hands the first decoder layer a tensor that is no view:
        # torch.compile guards on that, and a view there compiled the first layer's graph a second time.
        return embeds.index_put((rows, columns), features), matched

    # ------------------------------------------------------------------ training forward
    def _llm_cache_keyword(self) -> str:
        """The name under which the LLM's forward takes the KV cache: transformers 5.24 renamed past_key_values to
        cache in its own models (the old name warns, and goes in 5.40); InternLM2's forward here keeps the old."""
        forward = type(self.base_language_model).forward
        return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        image_flags: torch.LongTensor | None = None,
        past_key_values=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        loss_rows: LossRows | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """The original's training forward: image features written into the embeddings, the LLM, and with labels
        the token-mean cross-entropy of position t predicting label t + 1. attention_mask is the LLM's: a 2D
        padding mask, or a 4D mask (or BlockMask) in the form the LLM's attention implementation takes; further
        keyword arguments go to the LLM (e.g. transformers' FlashAttentionKwargs).

        With loss_rows, the LM head and the loss run at those rows only (the same loss and gradients as from full
        logits and the labels those rows hold) and `logits` holds just those rows, [B, R, vocab]."""
        past_key_values = kwargs.pop("cache", past_key_values)
        vit_embeds = self.extract_feature(pixel_values)
        if image_flags is not None:
            vit_embeds = vit_embeds[image_flags.reshape(-1) == 1]
        inputs_embeds, matched = self.embed_with_images(input_ids, vit_embeds, strict=False)
        if loss_rows is not None:
            return self._loss_at_rows(inputs_embeds, attention_mask, position_ids, loss_rows, matched, **kwargs)
        if past_key_values is not None:
            kwargs[self._llm_cache_keyword()] = past_key_values
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        logits = outputs.logits
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
            if not matched:
                loss = loss * 0.0
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not return_dict:
            out = (logits, outputs.past_key_values, outputs.hidden_states)
            return ((loss,) + out) if loss is not None else out
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )

    def _loss_at_rows(self, inputs_embeds, attention_mask, position_ids, loss_rows: LossRows, matched, **kwargs):
        steps = self.decoder_steps
        hidden = steps.hidden_at_rows(
            inputs_embeds, loss_rows.positions, loss_rows.mask, attention_mask, position_ids, **kwargs
        )
        logits = steps.logits_from_hidden(hidden).float()
        if loss_rows.weights is None:
            loss = F.cross_entropy(logits.flatten(0, 1), loss_rows.targets.flatten())  # spare slots' -100: ignored
        else:
            each = F.cross_entropy(logits.flatten(0, 1), loss_rows.targets.flatten(), reduction="none")
            loss = (each * loss_rows.weights.flatten().to(each.dtype)).sum()
        if not matched:
            loss = loss * 0.0
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        visual_features: torch.FloatTensor | None = None,
        generation_config: GenerationConfig | None = None,
        output_hidden_states: bool | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Greedy/beam generation from a prompt with image tokens; returns only the new tokens."""
        if pixel_values is not None or visual_features is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            if not bool((input_ids == self.img_context_token_id).any()):
                raise ValueError("pixel_values were given but the prompt has no <IMG_CONTEXT> tokens")
            inputs_embeds, _ = self.embed_with_images(input_ids, vit_embeds, strict=True)
        else:
            inputs_embeds, _ = self.embed_with_images(input_ids, None)
        return self.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=generation_config,
            output_hidden_states=output_hidden_states,
            **{"use_cache": True, **generate_kwargs},
        )

    def build_prompt(self, question: str, history=None) -> str:
        """The chat template's text of a conversation up to the assistant's turn (image placeholders unexpanded)."""
        template = get_conv_template(self.template)
        template.system_message = self.system_message
        for old_question, old_answer in history or []:
            template.append_message(template.roles[0], old_question)
            template.append_message(template.roles[1], old_answer)
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        return template.get_prompt()

    def _answers(self, tokenizer, pixel_values, model_inputs, generation_config: dict) -> list[str]:
        """Generate until the template's end-of-turn token; decode and cut each answer there."""
        sep = get_conv_template(self.template).sep.strip()
        device = self.language_model.get_input_embeddings().weight.device
        output_ids = self.generate(
            pixel_values=pixel_values,
            input_ids=model_inputs["input_ids"].to(device),
            attention_mask=model_inputs["attention_mask"].to(device),
            **dict(generation_config, eos_token_id=tokenizer.convert_tokens_to_ids(sep)),
        )
        return [text.split(sep)[0].strip() for text in tokenizer.batch_decode(output_ids, skip_special_tokens=True)]

    def chat(
        self,
        tokenizer,
        pixel_values,
        question: str,
        generation_config: dict,
        history=None,
        return_history: bool = False,
        num_patches_list=None,
        IMG_CONTEXT_TOKEN=IMG_CONTEXT_TOKEN,
        verbose: bool = False,
    ):
        if history is None and pixel_values is not None and "<image>" not in question:
            question = "<image>\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(
                f"num_patches_list sums to {sum(num_patches_list)}, pixel_values has {pixel_values.shape[0]} tiles"
            )
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        query = self.build_prompt(question, history)
        if verbose and pixel_values is not None:
            print(f"dynamic ViT batch size: {pixel_values.shape[0]}")
        for num_patches in num_patches_list:
            query = query.replace("<image>", image_placeholder(self.num_image_token, num_patches), 1)
        model_inputs = tokenizer(query, return_tensors="pt")
        response = self._answers(tokenizer, pixel_values, model_inputs, generation_config)[0]
        history = (history or []) + [(question, response)]
        if verbose:
            print(image_placeholder_collapsed(query), response, sep="\n")
        return (response, history) if return_history else response

    def batch_chat(
        self,
        tokenizer,
        pixel_values,
        questions: list[str],
        generation_config: dict,
        num_patches_list=None,
        history=None,
        return_history: bool = False,
        IMG_CONTEXT_TOKEN=IMG_CONTEXT_TOKEN,
        verbose: bool = False,
        image_counts=None,
    ):
        if history is not None or return_history:
            raise NotImplementedError("batch_chat is single-turn; use chat() for multi-turn conversations")
        if image_counts is not None:
            num_patches_list = image_counts
        if num_patches_list is None:
            raise ValueError("batch_chat needs num_patches_list: the number of tiles of each question's image")
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        queries = []
        for question, num_patches in zip(questions, num_patches_list):
            if pixel_values is not None and "<image>" not in question:
                question = "<image>\n" + question
            query = self.build_prompt(question)
            queries.append(query.replace("<image>", image_placeholder(self.num_image_token, num_patches), 1))
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            model_inputs = tokenizer(queries, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = padding_side
        return self._answers(tokenizer, pixel_values, model_inputs, generation_config)


# Every save_pretrained of this model (tools, Trainer checkpoints, merges) writes auto_map and copies these
# files, so the folder loads with AutoModel.from_pretrained(..., trust_remote_code=True).
InternVLChatConfig.register_for_auto_class()
InternVLChatModel.register_for_auto_class("AutoModel")
