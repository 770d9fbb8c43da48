"""Loading InternVL2 checkpoint folders with this package's classes.

A checkpoint's own .py files are never imported: our classes read its config.json, weights and tokenizer
files. Not part of the remote code copied into checkpoints.
"""

import json
import math
from pathlib import Path

import torch

from .configuration_internvl_chat import InternVLChatConfig
from .modeling_internvl_chat import InternVLChatModel
from .tokenization_internlm2 import InternLM2Tokenizer

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the fix."""


def check_checkpoint_folder(path: str | Path, need_tokenizer: bool = True) -> Path:
    folder = Path(path)
    hint = "download it with tools/download_model.sh or build one with tools/make_tiny_model.py"
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; {hint}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: not an InternVL2 checkpoint folder; {hint}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file} is not valid JSON ({error}); re-download the checkpoint") from error
    if config.get("model_type") != "internvl_chat":
        raise CheckpointError(
            f"{config_file} has model_type {config.get('model_type')!r}, expected 'internvl_chat' (InternVL2)"
        )
    weights = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not weights:
        raise CheckpointError(f"{folder} has no weights ({' / '.join(WEIGHT_FILES)}); the download is incomplete")
    if weights[0].endswith(".index.json"):
        index_file = folder / weights[0]
        shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_file} lists {len(shards)} shards but {len(missing)} are missing "
                f"(first: {folder / missing[0]}); resume the download"
            )
    if need_tokenizer:
        tokenizer_files = ("tokenizer.model", "tokenizer.json", "vocab.json")
        if not any((folder / name).is_file() for name in tokenizer_files):
            raise CheckpointError(f"{folder} has no tokenizer ({' / '.join(tokenizer_files)}); copy the base model's")
    return folder


def load_tokenizer(path: str | Path):
    """InternLM2's tokenizer is ours; the others (Qwen2, Phi3, Llama) are transformers' own classes."""
    folder = Path(path)
    tokenizer_config = folder / "tokenizer_config.json"
    tokenizer_class = None
    if tokenizer_config.is_file():
        tokenizer_class = json.loads(tokenizer_config.read_text()).get("tokenizer_class")
    if tokenizer_class == "InternLM2Tokenizer" or (folder / "tokenizer.model").is_file() and tokenizer_class is None:
        return InternLM2Tokenizer.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, use_fast=False)


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
