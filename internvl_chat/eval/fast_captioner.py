"""A lean batched caption generator for InternVL2 models of every LLM family (InternLM2: 2B, 8B, 26B; Qwen2: 1B;
Phi-3: 4B; Llama: 40B, 76B), written against the LLM's decoder steps (model/decoder_steps.py).

The prompt is the same for every image, so images with the same number of tiles give token sequences of the
same length: batches are formed per tile count and need no padding at all. Then
  - the ViT runs once over all tiles of the batch,
  - the prefill is one causal SDPA pass (no mask), its last layer computed at the last position only,
  - decoding is a greedy loop over a preallocated KV cache (written in place, never copied), with the
    logits of the last position only; each step has static shapes (it reads the whole cache under a mask
    of the filled positions), so on a GPU it is recorded once as a CUDA graph and replayed: one launch per
    token instead of hundreds of small kernels launched from Python,
instead of transformers' generate(), whose per-token overhead dominates at this model size.
Greedy decoding with the original's rules: at least min_new_tokens before <|im_end|> may end a caption.
"""

import time

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..model.conversation import IMG_CONTEXT_TOKEN, image_placeholder
from ..model.decoder_steps import DECODER_STEP_ARCHITECTURES, attention_window
from .caption_data import TileGroupedBatches

# The LLM's attention under the fast engine; evaluation loads the model with it (fast_engine_attention).
FAST_ATTENTION = "internvl_fast_decode"


def fast_decode_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """SDPA for the prefill; for single-token decoding, grouped-query attention as two batched matmuls over the
    cache, with the additive mask (0 / -inf over the cache's capacity) added to the scores. SDPA's GQA path
    would fall back to a kernel that copies the whole KV cache per layer and step, which made decoding ~10x
    slower than reading the cache once."""
    if query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scaling  # [B, Hkv, G, L]
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = scores.softmax(dim=-1).to(value.dtype)
    output = torch.matmul(probabilities, value)  # [B, Hkv, G, hd]
    return output.reshape(batch, 1, heads, head_dim), None


AttentionInterface.register(FAST_ATTENTION, fast_decode_attention)


class StaticKVCache:
    """Per-layer K/V buffers of a fixed capacity (what the decoder steps call is `update`, transformers' Cache's).

    The prefill writes positions [0, L) and attends to them. A decoding step writes one position given as a
    device tensor (`decode_position`) and returns the whole buffers: the step's shapes do not depend on how
    far decoding has got, and the caller masks the positions not filled yet. The buffers start at zero so
    that masked, never-written entries are finite (0 x NaN would still be NaN)."""

    def __init__(self, layer_devices, batch, kv_heads, head_dim, capacity, dtype):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for device in layer_devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for device in layer_devices]
        self.decode_position = torch.zeros(1, dtype=torch.long, device=layer_devices[0])
        self.decoding = False

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.decoding:
            position = self.decode_position.to(key.device)  # a model split over GPUs (--auto)
            self.keys[layer_idx].index_copy_(2, position, key)
            self.values[layer_idx].index_copy_(2, position, value)
            return self.keys[layer_idx], self.values[layer_idx]
        length = key.shape[2]
        self.keys[layer_idx][:, :, :length] = key
        self.values[layer_idx][:, :, :length] = value
        return key, value


class DecodeState:
    """Static buffers of greedy decoding for one (batch, prompt length): the KV cache, the step's input token
    and position, the eos bias (-inf while captions are shorter than min_new_tokens), the chosen tokens, and
    on a GPU the CUDA graph that replays one step. Reused by every batch of the same shape."""

    def __init__(self, llm, batch, prompt_length, max_new_tokens, dtype, device):
        config = llm.config
        self.capacity = prompt_length + max_new_tokens
        window = attention_window(config)
        if window is not None and self.capacity > window:
            raise ValueError(
                f"a prompt of {prompt_length} tokens and {max_new_tokens} new ones exceed the LLM's sliding window "
                f"of {window}, which the fast engine does not apply; caption with --engine hf"
            )
        layer_devices = llm.layer_devices()
        kv_heads, head_dim = llm.key_value_shape()
        self.cache = StaticKVCache(layer_devices, batch, kv_heads, head_dim, self.capacity, dtype)
        self.device = device
        self.single_device = len(set(layer_devices + [device])) == 1
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.chosen = torch.zeros(batch, dtype=torch.long, device=device)
        self.eos_bias = torch.zeros(config.vocab_size, dtype=torch.float32, device=device)
        self.positions = torch.arange(self.capacity, device=device)
        # [1, max_new_tokens, head_dim]: read by each step at its own index, a device tensor (no host sync)
        self.cos, self.sin = llm.decoding_position_embeddings(range(prompt_length, self.capacity), dtype, device)
        self.prompt_length = prompt_length
        self.graph = None


def supports_fast_path(config) -> bool:
    """The fast engine drives the decoder steps, which every InternVL2 LLM family has."""
    return config.llm_config.architectures[0] in DECODER_STEP_ARCHITECTURES


def fast_engine_attention(requested: str | None) -> dict:
    """The attn_implementation to load a model with for the fast engine: the ViT as asked (None: the model's
    default), the LLM through FAST_ATTENTION (SDPA for the prefill, a GQA kernel that reads the static cache once
    for decoding), or eager when eager is asked for (the reference maths)."""
    return {"vision_config": requested, "llm_config": "eager" if requested == "eager" else FAST_ATTENTION}


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
    """The fast engine as a Captioner (eval/captioner.py): batches of one tile count, captioned together."""

    def __init__(
        self,
        model,
        tokenizer,
        question: str,
        max_new_tokens: int = 30,
        min_new_tokens: int = 8,
        batch_size: int = 32,
        profile: bool = False,
        cuda_graphs: bool = True,
    ):
        if not supports_fast_path(model.config):
            raise ValueError(
                f"the fast captioner drives the decoder steps of {', '.join(DECODER_STEP_ARCHITECTURES)}; use "
                f"chat()/batch_chat() for {model.config.llm_config.architectures[0]}"
            )
        if model.config.llm_config._attn_implementation not in (FAST_ATTENTION, "eager"):
            raise ValueError(
                "load the model with attn_implementation=fast_engine_attention(...) for the fast "
                f"engine; its LLM runs {model.config.llm_config._attn_implementation!r}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.question = question if "<image>" in question else "<image>\n" + question
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.batch_size = batch_size
        model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        sep = model.conv_template.sep.strip()
        self.eos_id, self.sep = tokenizer.convert_tokens_to_ids(sep), sep
        self.llm = model.decoder_steps
        self._prompt_ids = {}
        self.timer = PhaseTimer(profile)
        self.cuda_graphs = cuda_graphs
        self._decode_state, self._decode_state_key = None, None

    def batches(self, dataset, indices: list[int]) -> list[list[int]]:
        """Images of one tile count a batch: their prompts have one length, so none needs padding."""
        return list(TileGroupedBatches(indices, dataset.tile_counts(), self.batch_size))

    def prompt_ids(self, num_tiles: int) -> torch.Tensor:
        if num_tiles not in self._prompt_ids:
            query = self.model.build_prompt(self.question).replace(
                "<image>", image_placeholder(self.model.num_image_token, num_tiles), 1
            )
            self._prompt_ids[num_tiles] = self.tokenizer(query, return_tensors="pt")["input_ids"][0]
        return self._prompt_ids[num_tiles]

    def prefill(self, embeds: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """The prompts into state's cache; the last position's normed hidden state, which gives the first token."""
        state.cache.decoding = False
        return self.llm.prefill(embeds, state.cache)

    def _greedy_choice(self, hidden, state):
        logits = self.llm.logits_from_hidden(hidden).float() + state.eos_bias
        state.chosen.copy_(logits.argmax(dim=-1))

    def _decode_step(self, state):
        """One token for every caption: state.token at state.cache.decode_position -> state.chosen. Only
        static shapes and device tensors, so that it can be recorded as a CUDA graph."""
        cache = state.cache
        step = cache.decode_position - state.prompt_length
        position_embeddings = state.cos.index_select(1, step), state.sin.index_select(1, step)
        mask = torch.zeros(state.capacity, dtype=state.cos.dtype, device=step.device)
        mask = mask.masked_fill(state.positions > cache.decode_position, float("-inf"))[None, None, None]
        hidden = self.llm.decode_step(state.token[:, None], position_embeddings, mask, cache)
        self._greedy_choice(hidden, state)

    def _run_step(self, state):
        if state.device.type != "cuda" or not state.single_device or not self.cuda_graphs:
            self._decode_step(state)
            return
        if state.graph is None:  # run the step on a side stream first (lazy inits), then record it
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._decode_step(state)
            torch.cuda.current_stream().wait_stream(side)
            state.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(state.graph):
                self._decode_step(state)
        state.graph.replay()

    def decode_state(self, batch: int, prompt_length: int, dtype, device) -> DecodeState:
        """The buffers of this shape: kept while batches keep it, since the CUDA graph is recorded on them."""
        key = (batch, prompt_length)
        if self._decode_state is None or self._decode_state_key != key:
            self._decode_state = None  # free the previous shape's cache and graph first
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self._decode_state = DecodeState(self.llm, batch, prompt_length, self.max_new_tokens, dtype, device)
            self._decode_state_key = key
        return self._decode_state

    @torch.inference_mode()
    def caption(self, pixel_values: torch.Tensor, tiles_per_image: list[int]) -> list[str]:
        """pixel_values: the tiles of images that all have the same number of tiles, image after image."""
        num_tiles = tiles_per_image[0]
        if any(tiles != num_tiles for tiles in tiles_per_image):
            raise ValueError(f"the fast captioner takes batches of one tile count, not {sorted(set(tiles_per_image))}")
        model = self.model
        batch = len(tiles_per_image)
        device = pixel_values.device
        self.timer.mark(None, device)
        ids = self.prompt_ids(num_tiles).to(device).expand(batch, -1)
        features = model.extract_feature(pixel_values)
        self.timer.mark("vision", device)
        embeds, _ = model.embed_with_images(ids, features, strict=True)
        state = self.decode_state(batch, ids.shape[1], embeds.dtype, device)
        hidden = self.prefill(embeds, state)
        self.timer.mark("prefill", device)
        tokens = torch.empty(batch, self.max_new_tokens, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        state.cache.decoding = True
        for step in range(self.max_new_tokens):
            if step in (0, self.min_new_tokens):
                state.eos_bias[self.eos_id] = float("-inf") if step < self.min_new_tokens else 0.0
            if step == 0:
                self._greedy_choice(hidden, state)
            else:
                state.token.copy_(tokens[:, step - 1])
                state.cache.decode_position.fill_(ids.shape[1] + step - 1)
                self._run_step(state)
            next_token = torch.where(finished, self.eos_id, state.chosen)
            tokens[:, step] = next_token
            finished |= next_token == self.eos_id
            if step + 1 == self.max_new_tokens or (step >= self.min_new_tokens and bool(finished.all())):
                tokens = tokens[:, : step + 1]
                break
        self.timer.mark("decode", device)
        texts = self.tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)
        return [text.split(self.sep)[0].strip() for text in texts]
