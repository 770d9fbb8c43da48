"""InternLM2, the language model of InternVL2-2B/8B/26B, written against transformers 5.

The checkpoint layout is kept exactly: `attention.wqkv` stays one fused projection whose output rows form
num_key_value_heads groups of [q_0 .. q_{G-1}, k, v] (G = heads per kv head), so original weights and LoRA
adapters trained on the fused matrix load unchanged. RoPE is the rotate-half (NeoX) form with optional linear
or dynamic-NTK scaling. Attention goes through transformers' dispatch table (eager / sdpa / flash / flex).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .configuration_internlm2 import InternLM2Config
from .decoder_steps import OutputRows, causal_prefill_mask, gather_rows, pad_keys_past_length, rotary_per_position
from .fused_kernels import RMSNorm as InternLM2RMSNorm
from .fused_kernels import add_then_norm, apply_rotary, silu_times


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of position t predicting label t+1 (labels are not shifted; -100 is ignored)."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device)
    )


class InternLM2RotaryEmbedding(nn.Module):
    """cos/sin for the given positions, computed in fp32; linear scaling divides positions by the factor,
    dynamic NTK enlarges the base only when the sequence is longer than max_position_embeddings."""

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.dim = config.hidden_size // config.num_attention_heads
        self.base = float(config.rope_theta)
        self.max_position_embeddings = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.scaling_type, self.scaling_factor = scaling.get("type"), float(scaling.get("factor", 1.0))
        self.register_buffer("inv_freq", self._inv_freq(self.base), persistent=False)

    def _inv_freq(self, base: float, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        return 1.0 / (base**exponents)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = position_ids.float()
        inv_freq = self.inv_freq
        if self.scaling_type == "linear":
            positions = positions / self.scaling_factor
        elif self.scaling_type == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.max_position_embeddings:
                ratio = self.scaling_factor * seq_len / self.max_position_embeddings - (self.scaling_factor - 1)
                inv_freq = self._inv_freq(self.base * ratio ** (self.dim / (self.dim - 2)), x.device)
        freqs = positions[:, :, None] * inv_freq.to(x.device)[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class InternLM2MLP(nn.Module):
    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.silu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu:
            return self.w2(silu_times(self.w1(x), self.w3(x)))
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2Attention(nn.Module):
    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        if self.head_dim * self.num_heads != config.hidden_size:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {self.num_heads}")
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.wqkv = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim, bias=config.bias
        )
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused wqkv output [B, L, rows] -> q [B, H, L, hd], k and v [B, H_kv, L, hd]."""
        batch, length, _ = qkv.shape
        grouped = qkv.view(batch, length, self.num_key_value_heads, self.num_key_value_groups + 2, self.head_dim)
        q = grouped[..., : self.num_key_value_groups, :].reshape(batch, length, self.num_heads, self.head_dim)
        k, v = grouped[..., -2, :], grouped[..., -1, :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        output_rows: OutputRows | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """With output_rows: keys and values of every position, the output [B, R, hidden] of those rows only."""
        batch, length, _ = hidden_states.shape
        q, k, v = self.split_qkv(self.wqkv(hidden_states))
        cos, sin = position_embeddings
        cos_q, sin_q = cos, sin
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if output_rows is not None:
            q = output_rows.gather(q.transpose(1, 2)).transpose(1, 2)
            cos_q, sin_q, length = output_rows.gather(cos), output_rows.gather(sin), output_rows.positions.shape[1]
            attention_mask = output_rows.mask
            if attention_mask is not None:  # a dense mask of a few rows, which not every backend takes
                attention = sdpa_attention_forward
        q, k = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if output_rows is not None and attention_mask is not None:
            k, v, attention_mask = pad_keys_past_length(k, v, attention_mask)
        out, _ = attention(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.wo(out.reshape(batch, length, -1))


class InternLM2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: InternLM2Config, layer_idx: int):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        output_rows: OutputRows | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attended = self.attention(
            self.attention_norm(hidden_states),
            position_embeddings,
            attention_mask,
            past_key_values,
            output_rows=output_rows,
            **kwargs,
        )
        if output_rows is not None:
            hidden_states = output_rows.gather(hidden_states)
        hidden_states, normed = add_then_norm(hidden_states, attended, None, self.ffn_norm)
        return hidden_states + self.feed_forward(normed)


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    config: InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The decoder's forward takes output_rows: its last layer then computes only the rows read afterwards.
    supports_output_rows = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, InternLM2RotaryEmbedding) and not module.inv_freq.is_meta:
            # A non-persistent buffer: from_pretrained allocates it empty, so it is refilled here.
            init.copy_(module.inv_freq, module._inv_freq(module.base, module.inv_freq.device))


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = InternLM2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_rows: OutputRows | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """output_rows: last_hidden_state holds only those rows, [B, R, hidden] (the last layer computes no other
        row; see OutputRows)."""
        # transformers >= 5.24 passes the cache as `cache`; accept both names.
        past_key_values = kwargs.pop("cache", past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        # Positions numbered here are one sequence per row: transformers need not look for packed sequences in
        # them (that check reads the GPU's result on the host).
        given_position_ids = position_ids
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past_seen
        # the cache by position: transformers 5.24 renamed the argument (past_key_values -> cache)
        mask = create_causal_mask(
            self.config, inputs_embeds, attention_mask, past_key_values, position_ids=given_position_ids
        )
        output_hidden_states = output_hidden_states or self.config.output_hidden_states
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states = () if output_hidden_states else None
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                position_embeddings,
                attention_mask=mask,
                past_key_values=past_key_values if use_cache else None,
                output_rows=output_rows if index == last else None,
                position_ids=position_ids,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
        )


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    """InternLM2 with its LM head. Besides forward(), the decoder-step interface (model/decoder_steps.py) that the
    fast caption engine and the training fast modes drive, so that they never reach into the model's modules."""

    _tied_weights_keys = {}

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, new_embeddings):
        self.output = new_embeddings

    def key_value_shape(self) -> tuple[int, int]:
        config = self.config
        return config.num_key_value_heads, config.hidden_size // config.num_attention_heads

    def layer_devices(self) -> list[torch.device]:
        return [layer.attention_norm.weight.device for layer in self.model.layers]

    def decoding_position_embeddings(
        self, positions: range, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_per_position(self.model.rotary_emb, positions, dtype, device)

    def prefill(
        self, inputs_embeds: torch.Tensor, cache: Cache, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """attention_mask None: a causal prefill without padding, which sdpa and flash attention infer; eager
        attention is given the causal mask explicitly. The last layer computes the last position only, the one
        whose output is read."""
        decoder = self.model
        length = inputs_embeds.shape[1]
        positions = torch.arange(length, device=inputs_embeds.device)[None]
        position_embeddings = decoder.rotary_emb(inputs_embeds, positions)
        if attention_mask is None and self.config._attn_implementation == "eager":
            attention_mask = causal_prefill_mask(inputs_embeds)
        hidden = inputs_embeds
        last = len(decoder.layers) - 1
        last_position = OutputRows.last_position(inputs_embeds)
        for index, layer in enumerate(decoder.layers):
            hidden = layer(
                hidden,
                position_embeddings,
                attention_mask=attention_mask,
                past_key_values=cache,
                output_rows=last_position if index == last else None,
            )
        return decoder.norm(hidden[:, -1])

    def decode_step(
        self,
        token_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache,
    ) -> torch.Tensor:
        decoder = self.model
        hidden = self.get_input_embeddings()(token_ids)
        for layer in decoder.layers:
            hidden = layer(hidden, position_embeddings, attention_mask=attention_mask, past_key_values=cache)
        return decoder.norm(hidden[:, -1])

    def logits_from_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(hidden_states)

    def hidden_at_rows(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        rows_mask: torch.Tensor | None = None,
        attention_mask=None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        inputs = dict(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        if rows_mask is None:
            return gather_rows(self.model(**inputs, **kwargs).last_hidden_state, positions)
        return self.model(**inputs, output_rows=OutputRows(positions, rows_mask), **kwargs).last_hidden_state

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        past_key_values = kwargs.pop("cache", past_key_values)
        kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.output(hidden_states[:, keep, :]).float()
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not return_dict:
            out = (logits, outputs.past_key_values, outputs.hidden_states)
            return ((loss,) + out) if loss is not None else out
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.past_key_values, hidden_states=outputs.hidden_states
        )
