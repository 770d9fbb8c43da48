"""Architecture presets of the InternVL2, InternVL2.5 and InternVL3 sizes, for random-weight models (tests,
benchmarks) and docs.

Real checkpoints are always read from their own config.json; these dicts only describe the shapes. The InternVL2
1B/2B/4B/8B values were checked against the original configs; the 26B/40B/76B LLM values come from the public model
cards of their base LLMs and are marked unverified where we could not read a real config.json. For InternVL2.5 and
InternVL3, the InternVL3-1B and InternVL2.5-2B configs were read whole; the other sizes take their LLM's shape from
its base model's config (Qwen2.5, InternLM2.5) with the fields the read ones share (vocabulary with the InternVL
tokens, untied head, the internvl2_5 template) and are marked unverified.
"""

import copy

VIT_300M = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=448,
    patch_size=14,
    norm_type="layer_norm",
    qkv_bias=True,
    qk_normalization=False,
    layer_norm_eps=1e-6,
    initializer_factor=1.0,
    drop_path_rate=0.0,
    architectures=["InternVisionModel"],
)
VIT_6B = dict(
    hidden_size=3200,
    intermediate_size=12800,
    num_hidden_layers=45,
    num_attention_heads=25,
    image_size=448,
    patch_size=14,
    norm_type="rms_norm",
    qkv_bias=False,
    qk_normalization=True,
    layer_norm_eps=1e-6,
    initializer_factor=0.1,
    drop_path_rate=0.0,
    architectures=["InternVisionModel"],
)
TILING = dict(
    force_image_size=448,
    downsample_ratio=0.5,
    dynamic_image_size=True,
    use_thumbnail=True,
    ps_version="v2",
    min_dynamic_patch=1,
    max_dynamic_patch=12,
    select_layer=-1,
)
PHI3_SU_SHORT_FACTOR = [
    1.05,
    1.05,
    1.05,
    1.1,
    1.1,
    1.1,
    1.2500000000000002,
    1.2500000000000002,
    1.4000000000000004,
    1.4500000000000004,
    1.5500000000000005,
    1.8500000000000008,
    1.9000000000000008,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.000000000000001,
    2.1000000000000005,
    2.1000000000000005,
    2.2,
    2.3499999999999996,
    2.3499999999999996,
    2.3499999999999996,
    2.3499999999999996,
    2.3999999999999995,
    2.3999999999999995,
    2.6499999999999986,
    2.6999999999999984,
    2.8999999999999977,
    2.9499999999999975,
    3.049999999999997,
    3.049999999999997,
    3.049999999999997,
]
PHI3_SU_LONG_FACTOR = [
    1.0299999713897705,
    1.0499999523162842,
    1.0499999523162842,
    1.0799999237060547,
    1.2299998998641968,
    1.2299998998641968,
    1.2999999523162842,
    1.4499999284744263,
    1.5999999046325684,
    1.6499998569488525,
    1.8999998569488525,
    2.859999895095825,
    3.68999981880188,
    5.419999599456787,
    5.489999771118164,
    5.489999771118164,
    9.09000015258789,
    11.579999923706055,
    15.65999984741211,
    15.769999504089355,
    15.789999961853027,
    18.360000610351562,
    21.989999771118164,
    23.079999923706055,
    30.009998321533203,
    32.35000228881836,
    32.590003967285156,
    35.56000518798828,
    39.95000457763672,
    53.840003967285156,
    56.20000457763672,
    57.95000457763672,
    59.29000473022461,
    59.77000427246094,
    59.920005798339844,
    61.190006256103516,
    61.96000671386719,
    62.50000762939453,
    63.3700065612793,
    63.48000717163086,
    63.48000717163086,
    63.66000747680664,
    63.850006103515625,
    64.08000946044922,
    64.760009765625,
    64.80001068115234,
    64.81001281738281,
    64.81001281738281,
]

PRESETS = {
    "InternVL2-1B": dict(
        template="Hermes-2",
        vision_config=VIT_300M,
        llm_config=dict(
            architectures=["Qwen2ForCausalLM"],
            vocab_size=151655,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            max_position_embeddings=32768,
            sliding_window=32768,
            use_sliding_window=False,
            max_window_layers=24,
            bos_token_id=151643,
            eos_token_id=151645,
            tie_word_embeddings=False,
        ),
    ),
    "InternVL2-2B": dict(
        template="internlm2-chat",
        vision_config=VIT_300M,
        llm_config=dict(
            architectures=["InternLM2ForCausalLM"],
            vocab_size=92553,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            rope_scaling={"type": "dynamic", "factor": 2.0},
            max_position_embeddings=32768,
            bias=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        ),
    ),
    "InternVL2-4B": dict(
        template="phi3-chat",
        vision_config=VIT_300M,
        llm_config=dict(
            architectures=["Phi3ForCausalLM"],
            vocab_size=32020,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            rope_scaling={"type": "su", "short_factor": PHI3_SU_SHORT_FACTOR, "long_factor": PHI3_SU_LONG_FACTOR},
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            sliding_window=262144,
            bos_token_id=1,
            eos_token_id=32000,
            pad_token_id=32000,
        ),
    ),
    "InternVL2-8B": dict(
        template="internlm2-chat",
        vision_config=VIT_300M,
        llm_config=dict(
            architectures=["InternLM2ForCausalLM"],
            vocab_size=92553,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            rope_scaling={"type": "dynamic", "factor": 2.0},
            max_position_embeddings=32768,
            bias=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        ),
    ),
    "InternVL2-26B": dict(
        template="internlm2-chat",
        vision_config=VIT_6B,
        llm_config=dict(
            architectures=["InternLM2ForCausalLM"],
            vocab_size=92553,
            hidden_size=6144,
            intermediate_size=16384,
            num_hidden_layers=48,
            num_attention_heads=48,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            rope_scaling={"type": "dynamic", "factor": 3.0},
            max_position_embeddings=32768,
            bias=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        ),
    ),
    # unverified: Nous-Hermes-2-Yi-34B dimensions; vocab includes the 9 InternVL tokens
    "InternVL2-40B": dict(
        template="Hermes-2",
        vision_config=VIT_6B,
        llm_config=dict(
            architectures=["LlamaForCausalLM"],
            vocab_size=64000,
            hidden_size=7168,
            intermediate_size=20480,
            num_hidden_layers=60,
            num_attention_heads=56,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=5e6,
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=7,
            pad_token_id=0,
        ),
    ),
    # unverified: Hermes-2-Theta-Llama-3-70B dimensions; vocab includes the 9 InternVL tokens
    "InternVL2-76B": dict(
        template="internlm2-chat",
        vision_config=VIT_6B,
        llm_config=dict(
            architectures=["LlamaForCausalLM"],
            vocab_size=128265,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=5e5,
            max_position_embeddings=8192,
            bos_token_id=128000,
            eos_token_id=128001,
        ),
    ),
}


# ----------------------------------------------------------------------------------------------- InternVL2.5 / 3

# The vocabulary of the InternVL2.5/3 LLMs: the base tokenizer's tokens and the nine InternVL tokens after them
# (Qwen2.5: <img> is 151665, so 151674 rows; InternLM2.5: <img> is 92544, so 92553 rows).
QWEN2_5_VOCAB = 151674
INTERNLM2_5_VOCAB = 92553


def qwen2_5_llm(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **extra) -> dict:
    """A Qwen2.5 LLM as the InternVL2.5/3 configs store it (Qwen2 architecture, head untied); `extra` overrides."""
    return (
        dict(
            architectures=["Qwen2ForCausalLM"],
            vocab_size=QWEN2_5_VOCAB,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            max_position_embeddings=32768,
            sliding_window=None,
            use_sliding_window=False,
            max_window_layers=70,
            bos_token_id=151643,
            eos_token_id=151645,
            tie_word_embeddings=False,
        )
        | extra
    )


def internlm2_5_llm(hidden: int, intermediate: int, layers: int, heads: int, **extra) -> dict:
    """An InternLM2.5 chat LLM (InternLM2 architecture, 8 key/value heads); `extra` overrides."""
    return (
        dict(
            architectures=["InternLM2ForCausalLM"],
            vocab_size=INTERNLM2_5_VOCAB,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            rope_theta=1e6,
            rope_scaling={"type": "dynamic", "factor": 2.0},
            max_position_embeddings=32768,
            bias=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            tie_word_embeddings=False,
        )
        | extra
    )


# The ViTs of InternVL2.5/3 (InternViT-300M-448px-V2_5, InternViT-6B-448px-V2_5): the same shapes as InternVL2's.
VIT_300M_V2_5 = dict(VIT_300M, initializer_factor=0.1)
VIT_6B_V2_5 = VIT_6B
# InternVL3 stores its Qwen2.5 LLMs with dynamic rope scaling (seen in InternVL3-1B's config).
INTERNVL3_ROPE = {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "eos_token_id": 151643}


def _internvl2_5(vision: dict, llm: dict) -> dict:
    return dict(template="internvl2_5", vision_config=vision, llm_config=llm)


PRESETS.update(
    {
        "InternVL2_5-1B": _internvl2_5(VIT_300M_V2_5, qwen2_5_llm(896, 4864, 24, 14, 2, max_window_layers=21)),
        "InternVL2_5-2B": _internvl2_5(VIT_300M_V2_5, internlm2_5_llm(2048, 8192, 24, 16)),
        # unverified below: the base LLMs' shapes (Qwen2.5-3B/32B/72B-Instruct, internlm2_5-7b/20b-chat)
        "InternVL2_5-4B": _internvl2_5(VIT_300M_V2_5, qwen2_5_llm(2048, 11008, 36, 16, 2)),
        "InternVL2_5-8B": _internvl2_5(VIT_300M_V2_5, internlm2_5_llm(4096, 14336, 32, 32)),
        "InternVL2_5-26B": _internvl2_5(
            VIT_6B_V2_5,
            internlm2_5_llm(6144, 16384, 48, 48, rope_theta=5e7, rope_scaling={"type": "dynamic", "factor": 2.5}),
        ),
        "InternVL2_5-38B": _internvl2_5(VIT_6B_V2_5, qwen2_5_llm(5120, 27648, 64, 40, 8)),
        "InternVL2_5-78B": _internvl2_5(VIT_6B_V2_5, qwen2_5_llm(8192, 29568, 80, 64, 8)),
        "InternVL3-1B": _internvl2_5(VIT_300M_V2_5, qwen2_5_llm(896, 4864, 24, 14, 2, **INTERNVL3_ROPE)),
        # unverified below: the base LLMs' shapes (Qwen2.5-1.5B/7B/14B/32B/72B)
        "InternVL3-2B": _internvl2_5(VIT_300M_V2_5, qwen2_5_llm(1536, 8960, 28, 12, 2, **INTERNVL3_ROPE)),
        "InternVL3-8B": _internvl2_5(VIT_300M_V2_5, qwen2_5_llm(3584, 18944, 28, 28, 4, **INTERNVL3_ROPE)),
        "InternVL3-14B": _internvl2_5(VIT_300M_V2_5, qwen2_5_llm(5120, 13824, 48, 40, 8, **INTERNVL3_ROPE)),
        "InternVL3-38B": _internvl2_5(VIT_6B_V2_5, qwen2_5_llm(5120, 27648, 64, 40, 8, **INTERNVL3_ROPE)),
        "InternVL3-78B": _internvl2_5(VIT_6B_V2_5, qwen2_5_llm(8192, 29568, 80, 64, 8, **INTERNVL3_ROPE)),
    }
)


# ----------------------------------------------------------------------------------------------- InternVL3.5 (dense)

# InternVL3.5's dense LLMs are Qwen3 (head_dim 128, each head's query and key RMS-normed). The shapes are the Qwen3
# bases' (unverified for InternVL3.5: no config.json of it was read); the vocabulary is Qwen3's 151669 tokens and
# the nine InternVL tokens (<IMG_CONTEXT> 151671, as InternVL3.5's converted configs name it); the head untied as in
# every InternVL generation before.
QWEN3_VOCAB = 151678


def qwen3_llm(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    return dict(
        architectures=["Qwen3ForCausalLM"],
        vocab_size=QWEN3_VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=40960,
        attention_bias=False,
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=False,
    )


PRESETS.update(
    {
        "InternVL3_5-1B": _internvl2_5(VIT_300M_V2_5, qwen3_llm(1024, 3072, 28, 16)),
        "InternVL3_5-2B": _internvl2_5(VIT_300M_V2_5, qwen3_llm(2048, 6144, 28, 16)),
        "InternVL3_5-4B": _internvl2_5(VIT_300M_V2_5, qwen3_llm(2560, 9728, 36, 32)),
        "InternVL3_5-8B": _internvl2_5(VIT_300M_V2_5, qwen3_llm(4096, 12288, 36, 32)),
        "InternVL3_5-14B": _internvl2_5(VIT_300M_V2_5, qwen3_llm(5120, 17408, 40, 40)),
        "InternVL3_5-38B": _internvl2_5(VIT_6B_V2_5, qwen3_llm(5120, 25600, 64, 64)),
    }
)


def preset_config_dict(name: str) -> dict:
    """A full InternVLChatConfig dict for one of the sizes (a deep copy; safe to modify)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    preset = copy.deepcopy(PRESETS[name])
    return {**TILING, **preset, "architectures": ["InternVLChatModel"]}
