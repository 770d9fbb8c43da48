"""The decoder-step interface: what a caller that keeps its own KV cache and decoding loop (the fast caption engine)
or reads only some rows of the last layer (the training fast modes) asks of an InternVL2 LLM, so that it never
reaches into one family's modules.

InternLM2ForCausalLM (2B, 8B, 26B) implements it itself; `TransformersDecoderSteps` implements it over transformers'
own Qwen2, Phi-3 and Llama causal LMs (1B, 4B, 40B, 76B) from their modules: projections, norms, rotary embedding
and MLP, LoRA-wrapped ones included, so that checkpoints and adapters are used unchanged. `decoder_steps_of(llm)`
gives the one an LLM has. The methods, with one contract for every family:

- supports_output_rows: the last layer can compute chosen rows only (hidden_at_rows with a rows mask).
- key_value_shape(): (key/value heads, head_dim) of each layer's cache.
- layer_devices(): the device of each decoder layer, in order (a cache puts each layer's buffers there).
- decoding_position_embeddings(positions, dtype, device): the rotary (cos, sin) of the given positions, each as a
  one-token step at that position computes it; [1, N, rotary dim] each.
- prefill(inputs_embeds, cache, attention_mask=None): the prompt [B, L, hidden] through every layer, keys and
  values written through `cache.update(key, value, layer_idx)`; the last layer computes the last position only;
  returns its final-normed hidden state, [B, hidden].
- decode_step(token_ids, position_embeddings, attention_mask, cache): one token a sequence, [B, 1], at the position
  that the given embeddings and the cache stand for; returns its final-normed hidden state [B, hidden]. Static
  shapes and device tensors only, so that a CUDA graph can record it.
- logits_from_hidden(hidden_states): the LM head, in the model's dtype.
- hidden_at_rows(inputs_embeds, positions, rows_mask=None, attention_mask=None, position_ids=None, **kwargs): the
  final-normed hidden states at positions [B, R] of a training forward; with rows_mask ([B, 1, R, L], bool, the
  rows' attention) the last layer computes those rows only, without it the whole layer.

Each computes what the LLM's forward() computes at the same positions.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from .fused_kernels import add_then_rms_norm, apply_rotary, rms_norm, silu_times

# The LLM families whose models have decoder steps: the LLMs of the seven InternVL2 sizes.
DECODER_STEP_ARCHITECTURES = (
    "InternLM2ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "LlamaForCausalLM",
)


@dataclass
class OutputRows:
    """The positions whose outputs are read from the last decoder layer: positions [B, R], one row of R per
    sequence, and the boolean attention mask of those queries, [B, 1, R, L] (True: may attend). The last layer
    computes keys and values at every position (the cache and the attention need them) and everything else at
    these R rows only. mask=None means each row may attend to every key, which holds for the last position of a
    causal prefill only."""

    positions: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.mask is None and self.positions.shape[1] != 1:
            raise ValueError("OutputRows of more than one position per sequence need their attention mask")

    @classmethod
    def last_position(cls, hidden_states: torch.Tensor) -> "OutputRows":
        batch, length = hidden_states.shape[:2]
        return cls(torch.full((batch, 1), length - 1, dtype=torch.long, device=hidden_states.device))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return gather_rows(tensor, self.positions)


def gather_rows(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tensor [B or 1, L, ...] -> [B, R, ...] at positions [B, R]."""
    batch, rows = positions.shape
    tensor = tensor.expand(batch, *tensor.shape[1:])
    index = positions.view(batch, rows, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    return tensor.gather(1, index)


# The output rows' dense mask reaches SDPA's fused kernels, which need its rows 8-aligned in memory. Left at the
# sequence's length, torch.compile guards the last layer's graph on that length's alignment and compiles a second
# graph when the other kind first appears, mid-run (seconds of stalled training). So the keys and the mask are
# padded past the length to a multiple of this, with keys that no row may see.
ROWS_MASK_KEY_MULTIPLE = 8


def pad_keys_past_length(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, multiple: int = ROWS_MASK_KEY_MULTIPLE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v [B, H_kv, L, hd] and the rows' mask [B, 1, R, L] -> the same with L' > L keys, L' a multiple of
    `multiple`, the extra keys zero and masked out (the attention's result is unchanged). Always at least one
    extra key, so that L' is the same expression of L for every length: an aligned L padding by zero would be a
    different graph under torch.compile."""
    extra = (k.shape[2] // multiple + 1) * multiple - k.shape[2]
    return F.pad(k, (0, 0, 0, extra)), F.pad(v, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def causal_prefill_mask(inputs_embeds: torch.Tensor) -> torch.Tensor:
    """The additive causal mask [1, 1, L, L] that eager attention needs for a prefill without padding (SDPA and flash
    attention infer it)."""
    length = inputs_embeds.shape[1]
    full = torch.full((length, length), float("-inf"), dtype=inputs_embeds.dtype, device=inputs_embeds.device)
    return full.triu(1)[None, None]


def sliding_layers(config) -> list[bool]:
    """Which decoder layers attend through a sliding window, as transformers' models decide it: a Qwen2 config's
    layer_types, else any sliding_window the config sets (Phi-3)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [kind == "sliding_attention" for kind in layer_types[: config.num_hidden_layers]]
    return [getattr(config, "sliding_window", None) is not None] * config.num_hidden_layers


def attention_window(config) -> int | None:
    """The fewest keys any layer of this LLM config attends to (its sliding window), or None for full attention
    everywhere. The decoder steps compute full attention: a sequence longer than this needs the model's forward."""
    return config.sliding_window if any(sliding_layers(config)) else None


def rotary_per_position(rotary, positions: range, dtype: torch.dtype, device: torch.device):
    """A rotary embedding module's (cos, sin) at each position, one call a position as a one-token step makes it,
    [1, N, rotary dim] each. Scalings that depend on the length a call sees (InternLM2's dynamic NTK, Phi-3's long
    rope) would make a table computed over all positions at once differ from the steps' own."""
    probe = torch.zeros(1, dtype=dtype, device=device)
    tables = [rotary(probe, torch.full((1, 1), position, device=device)) for position in positions]
    return torch.cat([cos for cos, _ in tables], dim=1), torch.cat([sin for _, sin in tables], dim=1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, H, L, hd] over the first cos.shape[-1] dimensions (all of them unless the config
    sets a partial rotary factor), the rest passed through, as transformers' apply_rotary_pos_emb."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)


class TransformersDecoderSteps:
    """The decoder steps of transformers' Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM or LlamaForCausalLM (the
    module docstring states the contract). The families differ in three places, read off the modules: Phi-3 projects
    q, k and v with one fused `qkv_proj` and gate and up with one `gate_up_proj`, and adds its residual dropouts;
    Qwen2, Qwen3 and Llama have separate projections (Qwen2's with biases); Qwen3 normalises each head's query and
    key (`q_norm`, `k_norm`) before the rotation. Rotary scaling (Phi-3's long rope, Llama 3's) is the model's
    own rotary embedding's. RMSNorm and SiLU x up run through the fused kernels, which compute transformers'
    formulas with the same rounding."""

    supports_output_rows = True

    def __init__(self, llm):
        self.llm, self.config = llm, llm.config
        self.decoder = llm.model
        layers = self.decoder.layers
        attention, mlp = layers[0].self_attn, layers[0].mlp
        self.num_heads, self.num_key_value_heads = self.config.num_attention_heads, self.config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.fused_qkv = hasattr(attention, "qkv_proj")
        self.fused_gate_up = hasattr(mlp, "gate_up_proj")
        self.head_norms = hasattr(attention, "q_norm")
        self.silu = self.config.hidden_act == "silu"
        self.window = attention_window(self.config)
        self.sliding = sliding_layers(self.config)
        for norm in (layers[0].input_layernorm, layers[0].post_attention_layernorm, self.decoder.norm):
            if not hasattr(norm, "variance_epsilon"):
                raise TypeError(f"{type(norm).__name__} is not the RMSNorm these decoder steps compute")

    # ------------------------------------------------------------------ the interface
    def key_value_shape(self) -> tuple[int, int]:
        return self.num_key_value_heads, self.head_dim

    def layer_devices(self) -> list[torch.device]:
        return [layer.input_layernorm.weight.device for layer in self.decoder.layers]

    def decoding_position_embeddings(
        self, positions: range, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_per_position(self.decoder.rotary_emb, positions, dtype, device)

    def prefill(self, inputs_embeds: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = inputs_embeds.shape[1]
        positions = torch.arange(length, device=inputs_embeds.device)[None]
        position_embeddings = self.decoder.rotary_emb(inputs_embeds, positions)
        if attention_mask is None and self.config._attn_implementation == "eager":
            attention_mask = causal_prefill_mask(inputs_embeds)
        hidden = inputs_embeds
        last = len(self.decoder.layers) - 1
        for index, layer in enumerate(self.decoder.layers):
            rows = OutputRows.last_position(inputs_embeds) if index == last else None
            hidden = self.layer_forward(layer, hidden, position_embeddings, attention_mask, cache, rows)
        return self.norm(self.decoder.norm, hidden[:, -1])

    def decode_step(
        self,
        token_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache,
    ) -> torch.Tensor:
        hidden = self.llm.get_input_embeddings()(token_ids)
        for layer in self.decoder.layers:
            hidden = self.layer_forward(layer, hidden, position_embeddings, attention_mask, cache)
        return self.norm(self.decoder.norm, hidden[:, -1])

    def logits_from_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.llm.get_output_embeddings()(hidden_states)

    def hidden_at_rows(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        rows_mask: torch.Tensor | None = None,
        attention_mask=None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Every layer but the last through the model's own decoder layers (their attention as configured, gradient
        checkpointing and compiled blocks as set up), under the masks the model's forward builds; the last layer
        here, at the rows only."""
        decoder = self.decoder
        length = inputs_embeds.shape[1]
        if rows_mask is None or (self.sliding[-1] and length > self.window):
            hidden = decoder(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **kwargs,
            ).last_hidden_state
            return gather_rows(hidden, positions)
        # Positions given as None are 0, 1, 2, ... in every row: the masks need not look for packed sequences
        # (that check reads the GPU's result on the host).
        numbered = position_ids if position_ids is not None else torch.arange(length, device=inputs_embeds.device)[None]
        masks = {}
        for sliding in set(self.sliding[:-1]):
            make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
            masks[sliding] = make_mask(self.config, inputs_embeds, attention_mask, None, position_ids=position_ids)
        position_embeddings = decoder.rotary_emb(inputs_embeds, numbered)
        hidden = inputs_embeds
        for layer, sliding in zip(decoder.layers[:-1], self.sliding):
            hidden = layer(
                hidden,
                attention_mask=masks[sliding],
                position_ids=numbered,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        last = decoder.layers[-1]
        last_layer = functools.partial(
            self.layer_forward,
            last,
            position_embeddings=position_embeddings,
            attention_mask=None,
            cache=None,
            rows=OutputRows(positions, rows_mask),
            **kwargs,
        )
        if getattr(last, "gradient_checkpointing", False) and last.training:
            hidden = last._gradient_checkpointing_func(last_layer, hidden)
        else:
            hidden = last_layer(hidden)
        return self.norm(decoder.norm, hidden)

    # ------------------------------------------------------------------ one decoder layer
    @staticmethod
    def norm(norm, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, norm.weight, norm.variance_epsilon)

    def project_qkv(self, attention, normed: torch.Tensor, rows: OutputRows | None):
        """q [B, H, R or L, hd] (at the rows only when given), k and v [B, H_kv, L, hd]."""
        batch, length, _ = normed.shape
        if self.fused_qkv:
            q_width, kv_width = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
            q, k, v = attention.qkv_proj(normed).split([q_width, kv_width, kv_width], dim=-1)
            if rows is not None:
                q = rows.gather(q)
        else:
            q = attention.q_proj(rows.gather(normed) if rows is not None else normed)
            k, v = attention.k_proj(normed), attention.v_proj(normed)
        q = q.view(batch, q.shape[1], self.num_heads, self.head_dim)
        k = k.view(batch, length, self.num_key_value_heads, self.head_dim)
        if self.head_norms:  # Qwen3: RMSNorm of every head's query and key, before the rotation
            q, k = self.norm(attention.q_norm, q), self.norm(attention.k_norm, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def mlp(self, mlp, normed: torch.Tensor) -> torch.Tensor:
        if not self.silu:
            return mlp(normed)
        if self.fused_gate_up:
            gate, up = mlp.gate_up_proj(normed).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(normed), mlp.up_proj(normed)
        return mlp.down_proj(silu_times(gate, up))

    def layer_forward(
        self,
        layer,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache=None,
        rows: OutputRows | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """One decoder layer as the model's forward computes it; with rows, its output at those rows only,
        [B, R, hidden] (keys and values still at every position)."""
        attention = layer.self_attn
        normed = self.norm(layer.input_layernorm, hidden_states)
        q, k, v = self.project_qkv(attention, normed, rows)
        cos, sin = position_embeddings
        cos_q, sin_q = (rows.gather(cos), rows.gather(sin)) if rows is not None else (cos, sin)
        q, k = rotate(q, cos_q, sin_q), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, attention.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        if rows is not None:
            attention_mask = rows.mask
            if attention_mask is not None:  # a dense mask of a few rows, which not every backend takes
                attend = sdpa_attention_forward
                k, v, attention_mask = pad_keys_past_length(k, v, attention_mask)
        dropout = attention.attention_dropout if attention.training else 0.0
        out, _ = attend(attention, q, k, v, attention_mask, scaling=attention.scaling, dropout=dropout, **kwargs)
        attended = attention.o_proj(out.reshape(q.shape[0], q.shape[2], -1))
        if hasattr(layer, "resid_attn_dropout"):  # Phi-3
            attended = layer.resid_attn_dropout(attended)
        residual = rows.gather(hidden_states) if rows is not None else hidden_states
        post_norm = layer.post_attention_layernorm
        hidden_states, normed = add_then_rms_norm(residual, attended, post_norm.weight, post_norm.variance_epsilon)
        out = self.mlp(layer.mlp, normed)
        if hasattr(layer, "resid_mlp_dropout"):
            out = layer.resid_mlp_dropout(out)
        return hidden_states + out


def decoder_steps_of(llm):
    """The decoder steps of an LLM (not PEFT's wrapper: its base model): the model itself where it has them
    (InternLM2), else transformers' families through TransformersDecoderSteps."""
    if hasattr(llm, "prefill") and hasattr(llm, "decode_step"):
        return llm
    architecture = type(llm).__name__
    if architecture not in DECODER_STEP_ARCHITECTURES:
        raise ValueError(
            f"no decoder steps for {architecture}; the families that have them: {DECODER_STEP_ARCHITECTURES}"
        )
    return TransformersDecoderSteps(llm)
