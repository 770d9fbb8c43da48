"""Analytic FLOP counts of a training step, for throughput and MFU logging.

Model FLOPs only: recomputation by gradient checkpointing is not counted (that would be hardware FLOPs).
A matmul of [m, k] x [k, n] is 2mkn. Frozen parts run forward only, except the LLM, whose activations still
need gradients to reach LoRA adapters (backward ~ forward for frozen weights, 2 x forward for trained ones).
"""

from dataclasses import dataclass

# bf16 dense peak, TFLOP/s, by substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "4090": 165.0,
    "A6000": 155.0,
}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


@dataclass
class FlopModel:
    vit_hidden: int
    vit_intermediate: int
    vit_layers: int
    vit_tokens: int  # patches + CLS per tile
    patch_size: int
    image_tokens: int  # LLM tokens per tile
    llm_hidden: int
    llm_matmul_params: int  # per token, all decoder-layer projections
    llm_layers: int
    vocab_size: int
    lora_params: int  # per token: sum over targeted linears of r * (in + out)
    llm_trainable: bool  # full fine-tuning of the LLM
    # The last decoder layer's rows after its QKV projection are computed at the logit positions only
    # (the decoder steps' hidden_at_rows); then that layer's other projections count at those rows.
    last_layer_at_logits: bool = False
    qkv_params: int = 0  # per layer: the QKV projection
    qkv_lora_params: int = 0  # per layer: its LoRA adapter
    attention_width: int = 0  # heads x head_dim (Qwen3's exceed the hidden size); 0: the hidden size

    @classmethod
    def from_config(
        cls, config, lora_rank: int = 0, llm_trainable: bool = False, last_layer_at_logits: bool = False
    ) -> "FlopModel":
        vision, llm = config.vision_config, config.llm_config
        hidden, inter = llm.hidden_size, llm.intermediate_size
        kv_heads = getattr(llm, "num_key_value_heads", None) or llm.num_attention_heads
        head_dim = getattr(llm, "head_dim", None) or hidden // llm.num_attention_heads  # Qwen3 sets its own
        q_width, kv_width = llm.num_attention_heads * head_dim, kv_heads * head_dim
        qkv_out = q_width + 2 * kv_width
        per_layer = hidden * qkv_out + q_width * hidden + 3 * hidden * inter
        # LoRA adds r x (in + out) a targeted linear: fused q/k/v (InternLM2's wqkv, Phi-3's qkv_proj) is one
        # linear, separate projections three; Phi-3's gate_up_proj is one, the others' gate and up two
        architecture = (llm.architectures or ["InternLM2ForCausalLM"])[0]
        fused_qkv = architecture in ("InternLM2ForCausalLM", "Phi3ForCausalLM")
        qkv_lora = (hidden + qkv_out) if fused_qkv else (3 * hidden + qkv_out)
        gate_up_lora = (hidden + 2 * inter) if architecture == "Phi3ForCausalLM" else 2 * (hidden + inter)
        lora = lora_rank * (qkv_lora + (q_width + hidden) + gate_up_lora + (inter + hidden))
        tile = config.tile_size
        return cls(
            vit_hidden=vision.hidden_size,
            vit_intermediate=vision.intermediate_size,
            vit_layers=vision.num_hidden_layers,
            vit_tokens=(tile // vision.patch_size) ** 2 + 1,
            patch_size=vision.patch_size,
            image_tokens=config.num_image_token,
            llm_hidden=hidden,
            llm_matmul_params=llm.num_hidden_layers * per_layer,
            llm_layers=llm.num_hidden_layers,
            vocab_size=llm.vocab_size,
            lora_params=llm.num_hidden_layers * lora,
            llm_trainable=llm_trainable,
            last_layer_at_logits=last_layer_at_logits,
            qkv_params=hidden * qkv_out,
            qkv_lora_params=lora_rank * qkv_lora,
            attention_width=q_width,
        )

    def vision_flops(self, tiles: int) -> float:
        d, t = self.vit_hidden, self.vit_tokens
        per_layer = 2 * t * (4 * d * d + 2 * d * self.vit_intermediate) + 4 * t * t * d
        patch = 2 * t * 3 * self.patch_size**2 * d
        merged = 4 * d
        projector = 2 * self.image_tokens * (merged * self.llm_hidden + self.llm_hidden**2)
        return tiles * (self.vit_layers * per_layer + patch + projector)

    def llm_flops(self, sequence_lengths: list[int], logit_positions: int, backward: bool = True) -> float:
        tokens = sum(sequence_lengths)
        forward = 2 * tokens * (self.llm_matmul_params + self.lora_params)
        width = self.attention_width or self.llm_hidden
        forward += sum(2 * n * n * width for n in sequence_lengths) * self.llm_layers  # causal QK^T + AV
        forward += 2 * logit_positions * self.llm_hidden * self.vocab_size
        skipped = max(tokens - logit_positions, 0) if self.last_layer_at_logits else 0
        last_layer_rest = self.llm_matmul_params // self.llm_layers - self.qkv_params
        last_layer_lora_rest = self.lora_params // self.llm_layers - self.qkv_lora_params
        forward -= 2 * skipped * (last_layer_rest + last_layer_lora_rest)  # (its attention's rows: left in, ~0.1%)
        if not backward:
            return forward
        weight_grads = 2 * (tokens * self.lora_params - skipped * last_layer_lora_rest)
        if self.llm_trainable:
            weight_grads += 2 * (tokens * self.llm_matmul_params - skipped * last_layer_rest)
        return 2 * forward + weight_grads  # activation gradients ~ forward, plus weight gradients

    def train_step_flops(self, tiles: int, sequence_lengths: list[int], logit_positions: int) -> float:
        return self.vision_flops(tiles) + self.llm_flops(sequence_lengths, logit_positions)

    def batch_flops(self, batch, logits_at_rows: bool) -> float:
        """A collated TrainingBatch's training FLOPs: the LM head at its loss rows only when the loss reads rows
        (BatchLayout.uses_loss_rows), else at every position."""
        counts = batch.counts
        logit_positions = counts.supervised if logits_at_rows else batch.input_ids.numel()
        return self.train_step_flops(batch.tiles, counts.lengths, logit_positions)
