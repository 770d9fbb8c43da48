"""Random InternVL checkpoints in the real on-disk format: config.json with auto_map, safetensors, the remote
code files, generation_config.json and a locally trained tokenizer with the InternVL tokens.

Tiny ones (a few MB) drive the demo and the tests; `like="InternVL2-2B"` gives random weights at full size for
GPU benchmarks. The tokenizer is always a tiny one: its ids are a subset of any real vocabulary. A generation
(GENERATIONS) is InternVL2 (the default), InternVL2.5 or InternVL3: the latter two use the internvl2_5 template, and
their Qwen2.5 LLMs get a Qwen2.5-style byte BPE tokenizer (no BOS) instead of the InternLM2-style sentencepiece one.
"""

from pathlib import Path

import torch
from transformers import GenerationConfig

from ..checkpoint.presets import TILING, VIT_6B, VIT_300M, preset_config_dict
from ..checkpoint.serving_files import complete_checkpoint_files
from ..model.configuration_internvl_chat import InternVLChatConfig
from ..model.conversation import get_conv_template
from ..model.modeling_internvl_chat import InternVLChatModel
from .tokenizer import QWEN2_5_SPECIAL_TOKENS, QWEN3_SPECIAL_TOKENS, build_tiny_qwen2_tokenizer, build_tiny_tokenizer
from .vocabulary import CAPTION_PROMPT, base_model_sentences, vocabulary_sentences

LLM_TYPES = {
    "internlm2": ("InternLM2ForCausalLM", "internlm2-chat"),
    "qwen2": ("Qwen2ForCausalLM", "Hermes-2"),
    "phi3": ("Phi3ForCausalLM", "phi3-chat"),
    "llama": ("LlamaForCausalLM", "Hermes-2"),
    "qwen3": ("Qwen3ForCausalLM", "internvl2_5"),
}
VIT_TYPES = {"300m": VIT_300M, "6b": VIT_6B}
# generation -> the LLM families its checkpoints have (the first is the default: the family of its COCO tutorial's
# 2B), and the template they all name
GENERATIONS = {
    "2": (("internlm2", "qwen2", "phi3", "llama"), None),
    "2.5": (("internlm2", "qwen2"), "internvl2_5"),
    "3": (("qwen2",), "internvl2_5"),
    "3.5": (("qwen3",), "internvl2_5"),
}
# phi3-chat's role and end markers, which the InternLM2-style tiny tokenizer lacks.
PHI3_CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def tiny_config_dict(
    llm: str = "internlm2",
    vit: str = "300m",
    vocab_size: int = 700,
    llm_hidden: int = 128,
    llm_layers: int = 2,
    vit_hidden: int = 64,
    vit_layers: int = 2,
    image_size: int = 448,
    generation: str = "2",
    token_ids: dict | None = None,
) -> dict:
    """A small model of the given family and generation: the real structure, with few layers and narrow widths.
    image_size is the tile size (224 gives 64 image tokens per tile instead of 256: a 4x cheaper demo); token_ids
    the LLM's bos/eos/pad ids where its tokenizer's differ from InternLM2's 1/2/2."""
    arch, template = LLM_TYPES[llm]
    families, generation_template = GENERATIONS[generation]
    if llm not in families:
        raise ValueError(f"InternVL{generation} has no {llm} LLM; its LLM families are {', '.join(families)}")
    template = generation_template or template
    vision = dict(
        VIT_TYPES[vit],
        hidden_size=vit_hidden,
        intermediate_size=2 * vit_hidden,
        num_hidden_layers=vit_layers,
        num_attention_heads=4,
        image_size=image_size,
    )
    heads = 4
    llm_config = dict(
        architectures=[arch],
        vocab_size=vocab_size,
        hidden_size=llm_hidden,
        intermediate_size=2 * llm_hidden,
        num_hidden_layers=llm_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=32768,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    llm_config.update(token_ids or {})
    if llm == "qwen3":
        # head_dim set apart from hidden / heads, as Qwen3's (1B: 16 heads of 128 over a hidden size of 1024)
        llm_config.update(head_dim=2 * llm_hidden // heads, rope_theta=1e6, max_position_embeddings=40960)
    if llm == "qwen2" and generation == "3":
        llm_config.update(rope_scaling={"rope_type": "dynamic", "factor": 2.0})  # as InternVL3-1B's config has it
    if llm == "internlm2":
        llm_config.update(bias=False, rope_scaling={"type": "dynamic", "factor": 2.0})
    elif llm == "phi3":
        half_head = llm_hidden // heads // 2
        llm_config.update(
            num_key_value_heads=heads,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            rope_theta=10000.0,
            rope_scaling={
                "type": "su",
                "short_factor": [1.0] * half_head,
                "long_factor": [1.0 + i / half_head for i in range(half_head)],
            },
        )
    return {
        **TILING,
        "force_image_size": image_size,
        "template": template,
        "vision_config": vision,
        "llm_config": llm_config,
        "architectures": ["InternVLChatModel"],
    }


def tokenizer_corpus(templates: tuple[str, ...] = ("internlm2-chat", "Hermes-2", "phi3-chat")) -> list[str]:
    """What a tiny tokenizer learns from: the synthetic COCO's words and a chat in each template."""
    corpus = vocabulary_sentences()
    for name in templates:
        template = get_conv_template(name)
        template.append_message(template.roles[0], "<image>\nDescribe the image.")
        template.append_message(template.roles[1], "A red circle.")
        corpus.append(template.get_prompt())
    return corpus


def pretrain_language_model(
    model: InternVLChatModel, tokenizer, steps: int, seed: int = 0, batch_size: int = 32, learning_rate: float = 3e-3
) -> list[float]:
    """Next-token training of the LLM alone (embeddings, layers, head) on text-only chats: the caption prompt,
    answered in the base-model style of vocabulary.BASE_MODEL_TEMPLATES. A random LLM cannot be rescued by LoRA
    alone (its frozen head keeps every logit within about +-3); after this it writes fluent descriptions that
    ignore the image, which is what caption fine-tuning then corrects. Returns the loss per step."""
    from ..data.collator import concat_pad_data_collator
    from ..data.preprocess import ConversationTokenizer

    encoder = ConversationTokenizer(tokenizer, model.config.template, model.num_image_token, 4096)
    answers = base_model_sentences(steps * batch_size, seed)
    llm = model.language_model.train()
    optimizer = torch.optim.AdamW(llm.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    losses = []
    for step in range(steps):
        chats = [
            [{"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": answer}]
            for answer in answers[step * batch_size : (step + 1) * batch_size]
        ]
        batch = concat_pad_data_collator(
            [
                {**encoder(chat, []).as_dict(), "pixel_values": torch.zeros(1), "image_flags": torch.zeros(1)}
                for chat in chats
            ]
        )
        loss = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    llm.eval()
    return losses


def build_checkpoint(
    out_dir: str | Path,
    llm: str = "internlm2",
    vit: str = "300m",
    like: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    pretrain_steps: int = 0,
    generation: str = "2",
    **tiny_dims,
) -> Path:
    """Write a random InternVL checkpoint of that generation to out_dir and return the path (with `like`, the
    preset's own generation)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    token_ids = None
    if like is None and generation != "2" and llm in ("qwen2", "qwen3"):
        specials = QWEN3_SPECIAL_TOKENS if llm == "qwen3" else QWEN2_5_SPECIAL_TOKENS
        tokenizer = build_tiny_qwen2_tokenizer(out_dir, tokenizer_corpus(("internvl2_5",)), special_tokens=specials)
        end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        eos = end_of_text if generation == "3" else tokenizer.convert_tokens_to_ids("<|im_end|>")
        token_ids = dict(bos_token_id=end_of_text, eos_token_id=eos, pad_token_id=None)
    elif like is None and generation != "2":
        tokenizer = build_tiny_tokenizer(out_dir, tokenizer_corpus(("internlm2-chat", "internvl2_5")))
    else:
        tokenizer = build_tiny_tokenizer(out_dir, tokenizer_corpus())
    if llm == "phi3" and like is None:
        tokenizer.add_tokens(PHI3_CHAT_TOKENS, special_tokens=True)
        tokenizer.save_pretrained(out_dir)
    if like is not None:
        config_dict = preset_config_dict(like)
    else:
        config_dict = tiny_config_dict(
            llm, vit, vocab_size=len(tokenizer), generation=generation, token_ids=token_ids, **tiny_dims
        )
    config = InternVLChatConfig(**config_dict)
    torch.manual_seed(seed)
    with torch.device(device):
        model = InternVLChatModel(config)
    if pretrain_steps:
        losses = pretrain_language_model(model, tokenizer, pretrain_steps, seed)
        print(f"language pretraining: {pretrain_steps} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config.llm_config).save_pretrained(out_dir)
    complete_checkpoint_files(out_dir, tokenizer)
    return out_dir
