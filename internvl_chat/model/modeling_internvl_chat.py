"""InternVLChatModel: InternViT -> pixel shuffle -> mlp1 -> an LLM, with image features written into the LLM's
input embeddings at the <IMG_CONTEXT> positions.

Attribute names are the original's (`vision_model`, `mlp1`, `language_model`), so they are also the checkpoint
key prefixes. LoRA adapters are wrapped in the constructor from `use_llm_lora` / `use_backbone_lora`, which is
what lets an unmerged LoRA training output load directly.
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, LlamaForCausalLM, Phi3ForCausalLM, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import is_flash_attn_2_available

from .configuration_internvl_chat import InternVLChatConfig
from .conversation import IMG_CONTEXT_TOKEN, get_conv_template, image_placeholder, image_placeholder_collapsed
from .modeling_intern_vit import InternVisionModel
from .modeling_internlm2 import InternLM2ForCausalLM, OutputRows, causal_lm_loss, gather_rows
from .shared_image_attention import PREFIX_SPLIT_ATTENTION, block_mask_from_dense, split_mask

LLM_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}

# The original's LoRA targets per LLM family; PEFT matches them as module-name suffixes.
LLM_LORA_TARGETS = {
    "InternLM2ForCausalLM": [
        "attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
    ],
    "Phi3ForCausalLM": ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"],
    "Qwen2ForCausalLM": [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj",
    ],
}
LLM_LORA_TARGETS["LlamaForCausalLM"] = LLM_LORA_TARGETS["Qwen2ForCausalLM"]
BACKBONE_LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def default_attn_implementation() -> str:
    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


# The LLM backends that take the [B, 1, L, L] mask of shared-image sequences (flash_attention_2 cannot).
BLOCK_MASK_ATTENTION = (PREFIX_SPLIT_ATTENTION, "flex_attention", "sdpa", "eager")


def block_mask_attention(requested: str | None) -> str:
    """The LLM's attention for shared-image sequences: a request that can take their mask is kept; otherwise the
    prefix split (shared_image_attention.py), the fastest of them (docs/PERFORMANCE.md)."""
    return requested if requested in BLOCK_MASK_ATTENTION else PREFIX_SPLIT_ATTENTION


def packed_attention(requested: str | None, device_type: str) -> str:
    """The LLM's attention for packed rows (several samples in one sequence, no padding): a request is kept;
    otherwise flash attention's varlen kernel where flash-attn imports, else flex attention with the samples'
    block-diagonal mask as a BlockMask on a GPU (empty blocks skipped), and SDPA under that mask on a CPU
    (PyTorch has no flex attention backward there)."""
    if requested in ("flash_attention_2", "flex_attention", "sdpa", "eager"):
        return requested
    if is_flash_attn_2_available():
        return "flash_attention_2"
    return "flex_attention" if device_type == "cuda" else "sdpa"


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


def only_right_padding(attention_mask: torch.Tensor | None) -> bool:
    """A 2D [batch, length] mask whose rows are all ones then all zeros (the training collator's padding)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return False
    keep = attention_mask.bool()
    return bool(keep[:, 0].all() & (keep[:, 1:] <= keep[:, :-1]).all())  # one host wait, not two


def packed_causal_mask(cu_seq_lens: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean [1, 1, length, length] mask of a packed row (True: may attend): causal within each sample of the
    boundaries cu_seq_lens ([0, end of sample 1, ..., length]), nothing across samples."""
    positions = torch.arange(length, device=cu_seq_lens.device, dtype=cu_seq_lens.dtype)
    sample = torch.searchsorted(cu_seq_lens[1:], positions, right=True)
    mask = (sample[:, None] == sample[None, :]) & (positions[None, :] <= positions[:, None])
    return mask[None, None]


def supervised_rows(labels: torch.Tensor, attention_mask: torch.Tensor | None, cu_seq_lens: torch.Tensor | None,
                    with_mask: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The positions the loss reads (t, where label t + 1 is supervised) and their targets, [B, R] each: R slots
    per sequence, R being the most any sequence has; a sequence's spare slots hold positions that are not
    supervised, with target -100. With with_mask, also the slots' attention mask ([B, 1, R, L] boolean, as
    OutputRows takes it), derived from the forward's mask as given: boolean [B or 1, 1, L, L], 2D padding, or
    each sample's causal mask in a packed row."""
    targets = labels[:, 1:]
    supervised = targets != -100
    slots = max(int(supervised.sum(dim=1).max()), 1)  # a host wait: the slots' shapes depend on it
    positions = torch.sort((~supervised).to(torch.uint8), dim=1, stable=True).indices[:, :slots]
    slot_targets = targets.gather(1, positions)
    if not with_mask:
        return positions, slot_targets, None
    length = labels.shape[1]
    keys = torch.arange(length, device=labels.device)
    own = keys[None, None, :] == positions[:, :, None]
    causal = keys[None, None, :] <= positions[:, :, None]
    if cu_seq_lens is not None:
        sample = torch.searchsorted(cu_seq_lens[1:], keys, right=True)
        allowed = causal & (sample[positions][..., None] == sample[None, None, :])
    elif attention_mask is not None and attention_mask.dim() == 4:
        rows = attention_mask[:, 0].expand(positions.shape[0], -1, -1)
        rows = rows.gather(1, positions[:, :, None].expand(-1, -1, length))
        allowed = rows if rows.dtype == torch.bool else rows == 0  # boolean, or additive 0 / -inf
    elif attention_mask is not None:
        allowed = causal & attention_mask.bool()[:, None, :]
    else:
        allowed = causal
    # A spare slot's position may see no key at all (a pad); seeing itself keeps its discarded output finite,
    # which matters: 0 x NaN in the backward would still be NaN.
    return positions, slot_targets, (allowed | own)[:, None]


def positions_through_padding(position_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Right padding's position ids continued one by one from the last real token. The collator pads them with 0,
    and transformers reads a position that restarts as the start of another packed sequence: it then builds a
    dense [B, 1, L, L] mask instead of letting SDPA run its causal kernel (no token attends to a pad, so the pads'
    positions change nothing else)."""
    lengths = keep.sum(dim=-1, keepdim=True)
    last = position_ids.gather(-1, (lengths - 1).clamp(min=0))
    steps = torch.arange(position_ids.shape[-1], device=position_ids.device) - lengths + 1
    return torch.where(keep, position_ids, last + steps)


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    config: InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "InternVisionModel", "LlamaDecoderLayer", "InternLM2DecoderLayer", "Phi3DecoderLayer", "Qwen2DecoderLayer",
    ]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    # forward() computes its own mean loss: Trainer must not rescale it by the number of items (ENVIRONMENT §2.4).
    accepts_loss_kwargs = False
    # The supervised-logits loss computes the LLM's last layer at the supervised rows only, where the LLM can
    # (llm_takes_output_rows); False computes it at every row, as before (the same loss: for measuring the gain).
    last_layer_at_supervised_rows = True

    def __init__(self, config: InternVLChatConfig, vision_model=None, language_model=None, use_flash_attn=None):
        requested_attn = config._attn_implementation
        super().__init__(config)
        if use_flash_attn is not None:
            requested_attn = "flash_attention_2" if use_flash_attn else "eager"
        attn = requested_attn if isinstance(requested_attn, str) else default_attn_implementation()
        config._attn_implementation = attn
        config.vision_config._attn_implementation = attn
        config.vision_config.use_flash_attn = attn == "flash_attention_2"
        config.llm_config._attn_implementation = attn

        vision_config = config.vision_config
        image_size = config.tile_size
        self.patch_size = vision_config.patch_size
        self.select_layer = config.select_layer
        self.template = config.template
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = int((image_size // self.patch_size) ** 2 * config.downsample_ratio**2)

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
            self.wrap_backbone_lora(r=config.use_backbone_lora, lora_alpha=2 * config.use_backbone_lora)
        if config.use_llm_lora:
            self.wrap_llm_lora(r=config.use_llm_lora, lora_alpha=2 * config.use_llm_lora)
        self.post_init()

    # ------------------------------------------------------------------ LoRA
    def wrap_backbone_lora(self, r=128, lora_alpha=256, lora_dropout=0.05):
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=r, target_modules=BACKBONE_LORA_TARGETS, lora_alpha=lora_alpha, lora_dropout=lora_dropout
        )
        self.vision_model = get_peft_model(self.vision_model, lora_config)
        self.vision_model.print_trainable_parameters()

    def wrap_llm_lora(self, r=128, lora_alpha=256, lora_dropout=0.05):
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=r,
            target_modules=LLM_LORA_TARGETS[self.config.llm_config.architectures[0]],
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            task_type="CAUSAL_LM",
        )
        self.language_model = get_peft_model(self.language_model, lora_config)
        self.language_model.enable_input_require_grads()
        self.language_model.print_trainable_parameters()

    def compile_blocks(self, dynamic: bool = True) -> int:
        """torch.compile every transformer block (ViT layers and LLM decoder layers) in place; returns how many.
        Blocks rather than the whole model: the image scatter and mask building stay eager, one compiled graph
        serves all layers of a stack, and state_dict keys do not change. dynamic=True because sequence lengths
        change from batch to batch."""
        blocks = [module for module in self.modules() if isinstance(module, GradientCheckpointingLayer)]
        # Blocks of a stack share one compiled forward, but a per-block constant (e.g. each ViT layer's own
        # stochastic-depth rate) may add a guarded variant per block, and past the default limit of 8 variants
        # the later blocks would silently run uncompiled.
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * len(blocks))
        for block in blocks:
            block.compile(dynamic=dynamic)
        return len(blocks)

    # ------------------------------------------------------------------ vision
    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        if self.ps_version == "v1":
            warnings.warn("ps_version 'v1' keeps the merged patch grid transposed; InternVL2 checkpoints use 'v2'.")
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
            raise ValueError("img_context_token_id is not set: assign tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>') "
                             "to model.img_context_token_id (chat() and batch_chat() do it themselves)")
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
            warnings.warn(message + "; the loss of this batch is zeroed")
            count = min(rows.numel(), features.shape[0])
            rows, columns, features = rows[:count], columns[:count], features[:count]
        # index_put keeps the features in the autograd graph (the original's `x * 0.0 + features`). Indexing the
        # [B, L, H] tensor itself, not a flattened view, hands the first decoder layer a tensor that is no view:
        # torch.compile guards on that, and a view there compiled the first layer's graph a second time.
        return embeds.index_put((rows, columns), features), matched

    # ------------------------------------------------------------------ training forward
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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_for_labels_only: bool = False,
        cu_seq_lens: torch.Tensor | None = None,
        max_seq_len: int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """With labels and logits_for_labels_only, the LM head runs only where a label is supervised (about 15 of
        ~1,850 positions of a COCO sample): the same loss and gradients, without the full-vocabulary logits
        everywhere; `logits` then holds just those rows, [batch, R, vocab] in the slots of supervised_rows.
        cu_seq_lens and max_seq_len describe a packed row (data.collator.packed_collator): several samples in one
        sequence, each attending to itself only."""
        past_key_values = kwargs.pop("cache", past_key_values)
        vit_embeds = self.extract_feature(pixel_values)
        if image_flags is not None:
            vit_embeds = vit_embeds[image_flags.reshape(-1) == 1]
        inputs_embeds, matched = self.embed_with_images(input_ids, vit_embeds, strict=False)
        loss_rows = None
        if labels is not None and logits_for_labels_only:
            # right after embed_with_images' own host wait, when the GPU's queue is short
            loss_rows = supervised_rows(labels.to(inputs_embeds.device), attention_mask, cu_seq_lens,
                                        with_mask=self.llm_takes_output_rows())
        attention_kwargs = {}
        if cu_seq_lens is not None:
            attention_mask, attention_kwargs = self._packed_attention_inputs(cu_seq_lens, max_seq_len,
                                                                             inputs_embeds.shape[1])
        attention_mask, position_ids = self._attention_inputs_for_backend(
            attention_mask, position_ids, inputs_embeds.dtype, past_key_values)
        if loss_rows is not None:
            return self._supervised_loss(inputs_embeds, attention_mask, position_ids, *loss_rows, matched,
                                         attention_kwargs)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **attention_kwargs,
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

    def _attention_inputs_for_backend(self, attention_mask, position_ids, dtype, past_key_values=None):
        """The training forward's mask and position ids as the attention backend needs them.
        - A 2D mask with padding on the right only (the collator's) is dropped: under causal attention no real
          token sees a right-side pad, so only the outputs at pad positions (never supervised) change, and
          SDPA/flash run their unmasked causal kernels. The pads' position ids are continued, or transformers
          would take them for the start of a packed sequence and build a dense mask after all.
        - A 4D boolean mask (True: may attend; e.g. several captions sharing one image prefix) goes to SDPA as it
          is; flex attention gets it as a BlockMask, so that it skips the blocks the mask leaves empty; the prefix
          split gets the rows after its causal head (a BlockMask on a GPU); eager attention adds its mask to the
          scores, so it gets 0 / -inf instead."""
        if past_key_values is None and only_right_padding(attention_mask):
            if position_ids is not None:
                position_ids = positions_through_padding(position_ids, attention_mask.bool().to(position_ids.device))
            return None, position_ids
        if attention_mask is None or attention_mask.dim() != 4 or attention_mask.dtype != torch.bool:
            return attention_mask, position_ids
        implementation = self.config.llm_config._attn_implementation
        if implementation not in BLOCK_MASK_ATTENTION:
            raise ValueError(f"the LLM's attention {implementation!r} cannot take the [B, 1, L, L] mask of "
                             f"shared-image sequences (--group_by_image); use one of {BLOCK_MASK_ATTENTION} for "
                             "the LLM (block_mask_attention picks one)")
        if implementation == PREFIX_SPLIT_ATTENTION:
            return split_mask(attention_mask, flex_tail=attention_mask.device.type == "cuda"), position_ids
        if implementation == "flex_attention":
            return block_mask_from_dense(attention_mask), position_ids
        if implementation != "eager":
            return attention_mask, position_ids
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        return bias.masked_fill(~attention_mask, torch.finfo(dtype).min), position_ids

    def _packed_attention_inputs(self, cu_seq_lens, max_seq_len, length):
        """A packed row's attention inputs: flash attention's varlen kernel takes the boundaries themselves
        (transformers' FlashAttentionKwargs); the other backends get the block-diagonal causal mask, which
        _attention_inputs_for_backend converts as any 4D mask (a BlockMask for flex attention)."""
        if self.config.llm_config._attn_implementation.startswith("flash_attention"):
            return None, {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                          "max_length_q": max_seq_len, "max_length_k": max_seq_len}
        return packed_causal_mask(cu_seq_lens, length), {}

    def _llm_decoder(self):
        llm = self.language_model
        llm = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # a PEFT wrapper keeps its adapters
        return llm.model

    def llm_takes_output_rows(self) -> bool:
        """Whether the supervised-logits loss computes the LLM's last layer at the supervised rows only."""
        return self.last_layer_at_supervised_rows and getattr(self._llm_decoder(), "supports_output_rows", False)

    def _supervised_loss(self, inputs_embeds, attention_mask, position_ids, positions, targets, rows_mask, matched,
                         attention_kwargs):
        """The LM head and the loss at the supervised positions only. An LLM whose decoder takes output_rows
        (InternLM2) computes its last layer only there too: nothing reads that layer's other rows."""
        decoder = self._llm_decoder()
        inputs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False, return_dict=True, **attention_kwargs)
        if rows_mask is not None:
            hidden = decoder(**inputs, output_rows=OutputRows(positions, rows_mask)).last_hidden_state
        else:
            hidden = gather_rows(decoder(**inputs).last_hidden_state, positions)
        logits = self.language_model.get_output_embeddings()(hidden).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # the spare slots' -100 are ignored
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

    def _prompt(self, question: str, history=None) -> str:
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
        IMG_START_TOKEN=None,
        IMG_END_TOKEN=None,
        IMG_CONTEXT_TOKEN=IMG_CONTEXT_TOKEN,
        verbose: bool = False,
    ):
        if history is None and pixel_values is not None and "<image>" not in question:
            question = "<image>\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(f"num_patches_list sums to {sum(num_patches_list)}, pixel_values has "
                             f"{pixel_values.shape[0]} tiles")
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        query = self._prompt(question, history)
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
        IMG_START_TOKEN=None,
        IMG_END_TOKEN=None,
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
            query = self._prompt(question)
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
