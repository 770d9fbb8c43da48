"""What a checkpoint folder must hold before anything is loaded from it, checked without torch: the launchers run
these checks before torchrun starts, in well under a second. Not part of the remote code copied into checkpoints."""

import json
import re
from pathlib import Path

from ..model.conversation import conv_templates

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# The LLM architectures InternVLChatConfig builds (its LLM_CONFIG_CLASSES; a test holds the two equal), and ones
# known to exist in InternVL checkpoints that this repository does not run, with what they are.
LLM_ARCHITECTURES = (
    "InternLM2ForCausalLM",
    "LlamaForCausalLM",
    "Phi3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
UNSUPPORTED_LLM_ARCHITECTURES = {
    "InternLM3ForCausalLM": "InternLM3 (InternVL3-9B's LLM, if its config names it so)",
    "Qwen3MoeForCausalLM": "Qwen3 MoE (InternVL3.5-30B-A3B, -241B-A28B)",
    "GptOssForCausalLM": "GPT-OSS (InternVL3.5-GPT-OSS-20B)",
}
# Tokenizer classes of InternVL checkpoints that no code here loads
UNSUPPORTED_TOKENIZERS = {"InternLM3Tokenizer": "InternVL3-9B's InternLM3 tokenizer (tokenization_internlm3.py)"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json")


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
    check_llm_and_template(config, config_file)
    if need_tokenizer:
        check_tokenizer(folder, config["template"])
    return folder


def check_llm_and_template(config: dict, config_file: Path) -> None:
    """The LLM architecture is one this repository runs, and the chat template one it knows."""
    architectures = (config.get("llm_config") or {}).get("architectures") or ["InternLM2ForCausalLM"]
    architecture = architectures[0]
    if architecture in UNSUPPORTED_LLM_ARCHITECTURES:
        raise CheckpointError(
            f"{config_file}: the LLM is {architecture}, {UNSUPPORTED_LLM_ARCHITECTURES[architecture]}, which this "
            f"repository does not run; it runs {', '.join(LLM_ARCHITECTURES)} (InternVL2, 2.5, 3 and 3.5's dense sizes)"
        )
    if architecture not in LLM_ARCHITECTURES:
        raise CheckpointError(
            f"{config_file}: llm_config.architectures names {architecture!r}, an LLM this repository does not know; "
            f"it runs {', '.join(LLM_ARCHITECTURES)} (is this an InternVL2/2.5/3/3.5 checkpoint?)"
        )
    template = config.get("template")
    if template not in conv_templates:
        raise CheckpointError(
            f"{config_file}: template {template!r} is not a chat template of a known InternVL generation (known: "
            f"{', '.join(sorted(conv_templates))}); set the checkpoint's own template in its config.json"
        )


def template_special_tokens(template_name: str) -> list[str]:
    """The `<|...|>` tokens the template's prompt is made of (InternVL2.5's <|im_start|> and <|im_end|>, ...)."""
    template = conv_templates[template_name]
    text = template.system_template + "".join(template.roles) + template.sep
    return sorted(set(re.findall(r"<\|[a-z_]+\|>", text)))


def check_tokenizer(folder: Path, template_name: str) -> None:
    """The folder has a tokenizer that this repository loads and that holds the template's special tokens: a
    tokenizer without them would spell <|im_end|> out in pieces, and train and caption on that."""
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        raise CheckpointError(f"{folder} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); copy the base model's")
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        tokenizer_class = json.loads(tokenizer_config.read_text()).get("tokenizer_class")
        if tokenizer_class in UNSUPPORTED_TOKENIZERS:
            raise CheckpointError(
                f"{tokenizer_config}: {tokenizer_class} is {UNSUPPORTED_TOKENIZERS[tokenizer_class]}, which this "
                "repository does not load"
            )
    files = [
        folder / name for name in (*present, "tokenizer_config.json", "added_tokens.json") if (folder / name).is_file()
    ]
    contents = b"".join(path.read_bytes() for path in files)
    missing = [token for token in template_special_tokens(template_name) if token.encode() not in contents]
    if missing:
        raise CheckpointError(
            f"{folder}: the tokenizer ({', '.join(present)}) lacks {', '.join(missing)} of the {template_name} "
            "template the checkpoint's config.json names; copy the tokenizer files of the checkpoint's base model"
        )
