"""Configuration of InternLM2, the language model of InternVL2-2B, -8B, -26B (and InternLM2 chat models).

Field names and defaults follow the original `InternLM2Config`, so that the original config.json files load
unchanged and the files we write load in the original code.
"""

from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Shadows the base class property that maps rope_scaling onto rope_parameters: InternLM2 keeps the
    # original {"type": "linear"|"dynamic", "factor": f} dict and applies it itself.
    rope_scaling = None

    def __init__(
        self,
        vocab_size=103168,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        bias=True,
        rope_theta=10000,
        rope_scaling=None,
        attn_implementation="eager",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.bias = bias
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self._check_rope_scaling()
        # Kept as written in the checkpoint; the model itself follows `_attn_implementation`.
        self.attn_implementation = attn_implementation
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(**kwargs)

    def _check_rope_scaling(self):
        if self.rope_scaling is None:
            return
        if not isinstance(self.rope_scaling, dict) or len(self.rope_scaling) != 2:
            raise ValueError(f"rope_scaling must be a dict {{'type': ..., 'factor': ...}}, got {self.rope_scaling}")
        kind, factor = self.rope_scaling.get("type"), self.rope_scaling.get("factor")
        if kind not in ("linear", "dynamic"):
            raise ValueError(f"rope_scaling type must be 'linear' or 'dynamic', got {kind!r}")
        if not isinstance(factor, (int, float)) or factor < 1.0:
            raise ValueError(f"rope_scaling factor must be a number >= 1, got {factor!r}")
