"""A lean batched caption generator for InternLM2-based InternVL2 models (2B, 8B, 26B).

The prompt is the same for every image, so images with the same number of tiles give token sequences of the
same length: batches are formed per tile count and need no padding at all. Then
  - the ViT runs once over all tiles of the batch,
  - the prefill is one causal pass (SDPA's flash kernel, no mask),
  - decoding is a greedy loop over a preallocated KV cache (written in place, never copied), with the
    logits of the last position only,
instead of transformers' generate(), whose per-token overhead dominates at this model size.
Greedy decoding with the original's rules: at least min_new_tokens before <|im_end|> may end a caption.
"""
import time

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..model.conversation import IMG_CONTEXT_TOKEN, image_placeholder


FAST_ATTENTION = "internvl_fast_decode"


def fast_decode_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """SDPA for prefill and masked calls; for single-token decoding without a mask, grouped-query attention
    as two batched matmuls over the cache views. SDPA's GQA path would fall back to a kernel that copies the
    whole KV cache per layer and step, which made decoding ~10x slower than reading the cache once."""
    if query.shape[2] != 1 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scaling  # [B, Hkv, G, L]
    probabilities = scores.softmax(dim=-1).to(value.dtype)
    output = torch.matmul(probabilities, value)  # [B, Hkv, G, hd]
    return output.reshape(batch, 1, heads, head_dim), None


AttentionInterface.register(FAST_ATTENTION, fast_decode_attention)


class StaticKVCache:
    """Per-layer K/V buffers of a fixed capacity; `update` writes the new positions and returns views of
    everything written so far (the interface InternLM2Attention calls)."""

    def __init__(self, num_layers, batch, kv_heads, head_dim, capacity, dtype, device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # positions filled in every layer before the current forward

    def update(self, key, value, layer_idx, *args, **kwargs):
        end = self.length + key.shape[2]
        self.keys[layer_idx][:, :, self.length:end] = key
        self.values[layer_idx][:, :, self.length:end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


def supports_fast_path(model) -> bool:
    return model.config.llm_config.architectures[0] == "InternLM2ForCausalLM"


class PhaseTimer:
    """Seconds per phase, measured with a device synchronisation at each boundary (only when enabled)."""

    def __init__(self, enabled: bool):
        self.enabled, self.seconds, self._last = enabled, {}, None

    def mark(self, phase: str | None, device) -> None:
        if not self.enabled:
            return
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if phase is not None and self._last is not None:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


class FastCaptioner:
    def __init__(self, model, tokenizer, question: str, max_new_tokens: int = 30, min_new_tokens: int = 8,
                 profile: bool = False):
        if not supports_fast_path(model):
            raise ValueError("the fast captioner drives InternLM2 decoder layers; use chat()/batch_chat() for "
                             f"{model.config.llm_config.architectures[0]}")
        self.model, self.tokenizer = model, tokenizer
        self.question = question if "<image>" in question else "<image>\n" + question
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        sep = model.conv_template.sep.strip()
        self.eos_id, self.sep = tokenizer.convert_tokens_to_ids(sep), sep
        llm = model.language_model
        self.llm = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # unmerged LoRA: PEFT wrapper
        self._prompt_ids = {}
        self.timer = PhaseTimer(profile)

    def prompt_ids(self, num_tiles: int) -> torch.Tensor:
        if num_tiles not in self._prompt_ids:
            query = self.model._prompt(self.question).replace(
                "<image>", image_placeholder(self.model.num_image_token, num_tiles), 1)
            self._prompt_ids[num_tiles] = self.tokenizer(query, return_tensors="pt")["input_ids"][0]
        return self._prompt_ids[num_tiles]

    def _layers(self, hidden, positions, cache):
        decoder = self.llm.model
        position_embeddings = decoder.rotary_emb(hidden, positions)
        mask = None  # sdpa and flash attention infer causality for a prefill without padding
        if self.llm.config._attn_implementation == "eager" and hidden.shape[1] > 1:
            length = hidden.shape[1]
            mask = torch.full((length, length), float("-inf"), dtype=hidden.dtype, device=hidden.device).triu(1)
            mask = mask[None, None]
        for layer in decoder.layers:
            hidden = layer(hidden, position_embeddings, attention_mask=mask, past_key_values=cache)
        cache.length += hidden.shape[1]
        return decoder.norm(hidden[:, -1:])

    @torch.inference_mode()
    def caption(self, pixel_values: torch.Tensor, num_tiles: int) -> list[str]:
        """pixel_values: [B * num_tiles, 3, S, S] of B images that all have num_tiles tiles."""
        config = self.llm.config
        chosen = config._attn_implementation
        if chosen != "sdpa":  # eager (reference maths) and flash attention are used as configured
            return self._caption(pixel_values, num_tiles)
        config._attn_implementation = FAST_ATTENTION
        try:
            return self._caption(pixel_values, num_tiles)
        finally:
            config._attn_implementation = chosen

    def _caption(self, pixel_values: torch.Tensor, num_tiles: int) -> list[str]:
        model, llm = self.model, self.llm
        batch = pixel_values.shape[0] // num_tiles
        device = pixel_values.device
        self.timer.mark(None, device)
        ids = self.prompt_ids(num_tiles).to(device).expand(batch, -1)
        features = model.extract_feature(pixel_values)
        self.timer.mark("vision", device)
        embeds, _ = model.embed_with_images(ids, features, strict=True)
        config = llm.config
        head_dim = config.hidden_size // config.num_attention_heads
        cache = StaticKVCache(config.num_hidden_layers, batch, config.num_key_value_heads, head_dim,
                              ids.shape[1] + self.max_new_tokens, embeds.dtype, device)
        positions = torch.arange(ids.shape[1], device=device).expand(batch, -1)
        hidden = self._layers(embeds, positions, cache)
        self.timer.mark("prefill", device)
        output = llm.output
        tokens = torch.empty(batch, self.max_new_tokens, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(self.max_new_tokens):
            logits = output(hidden[:, -1]).float()
            if step < self.min_new_tokens:
                logits[:, self.eos_id] = float("-inf")
            next_token = logits.argmax(dim=-1)
            next_token = torch.where(finished, torch.full_like(next_token, self.eos_id), next_token)
            tokens[:, step] = next_token
            finished |= next_token == self.eos_id
            if step + 1 == self.max_new_tokens or (step >= self.min_new_tokens and bool(finished.all())):
                tokens = tokens[:, : step + 1]
                break
            position = torch.full((batch, 1), cache.length, device=device, dtype=torch.long)
            hidden = self._layers(llm.get_input_embeddings()(next_token[:, None]), position, cache)
        self.timer.mark("decode", device)
        texts = self.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
        return [text.split(self.sep)[0].strip() for text in texts]
