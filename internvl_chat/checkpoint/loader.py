"""Loading InternVL2 checkpoint folders with this package's classes.

A checkpoint's own .py files are never imported: our classes read its config.json, weights and tokenizer
files. Not part of the remote code copied into checkpoints.
"""

import json
import math
from pathlib import Path

import torch

from ..model.configuration_internvl_chat import InternVLChatConfig
from ..model.modeling_internvl_chat import InternVLChatModel
from ..model.tokenization_internlm2 import InternLM2Tokenizer
from .folder import check_checkpoint_folder


def load_tokenizer(path: str | Path):
    """InternLM2's tokenizer is ours; the others (Qwen2, Phi3, Llama) are transformers' own classes."""
    folder = Path(path)
    tokenizer_config = folder / "tokenizer_config.json"
    tokenizer_class = None
    if tokenizer_config.is_file():
        tokenizer_class = json.loads(tokenizer_config.read_text()).get("tokenizer_class")
    if tokenizer_class == "InternLM2Tokenizer" or (folder / "tokenizer.model").is_file() and tokenizer_class is None:
        return InternLM2Tokenizer.from_pretrained(folder)
    import transformers

    named_class = getattr(transformers, tokenizer_class, None) if tokenizer_class else None
    if isinstance(named_class, type):
        # the class the folder names, directly: AutoTokenizer would also read config.json, whose internvl_chat
        # model type it does not know, and say so in a warning at every load
        return named_class.from_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False, use_fast=False)


def split_model_device_map(config: InternVLChatConfig, num_gpus: int) -> dict[str, int]:
    """The original `--auto` placement: the LLM's layers spread over the GPUs with GPU 0 taking half a share
    (it also holds the ViT, mlp1, embeddings, head, final norm and the last layer)."""
    num_layers = config.llm_config.num_hidden_layers
    per_gpu = math.ceil(num_layers / (num_gpus - 0.5))
    counts = [per_gpu] * num_gpus
    counts[0] = math.ceil(per_gpu * 0.5)
    device_map, layer = {}, 0
    for gpu, count in enumerate(counts):
        for _ in range(count):
            if layer < num_layers:
                device_map[f"language_model.model.layers.{layer}"] = gpu
                layer += 1
    arch = config.llm_config.architectures[0]
    embed, head = ("tok_embeddings", "output") if arch == "InternLM2ForCausalLM" else ("embed_tokens", "lm_head")
    for name in (
        "vision_model",
        "mlp1",
        f"language_model.model.{embed}",
        f"language_model.{head}",
        "language_model.model.norm",
        "language_model.model.rotary_emb",
        f"language_model.model.layers.{num_layers - 1}",
    ):
        device_map[name] = 0
    return device_map


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    auto: bool = False,
) -> InternVLChatModel:
    """Load a plain or unmerged-LoRA InternVL2 checkpoint in eval mode.

    dtype defaults to bf16 on CUDA and fp32 on CPU; `auto` spreads a large model over all visible GPUs."""
    folder = check_checkpoint_folder(path, need_tokenizer=False)
    cuda = torch.cuda.is_available()
    device = torch.device(device or ("cuda" if cuda else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if auto:
        if not cuda:
            raise ValueError("--auto splits the model over GPUs, but no GPU is visible")
        config = InternVLChatConfig.from_pretrained(folder)
        kwargs["device_map"] = split_model_device_map(config, torch.cuda.device_count())
    model = InternVLChatModel.from_pretrained(folder, **kwargs).eval()
    if not auto:
        model = model.to(device)
    return model
