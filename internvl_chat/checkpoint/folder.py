"""What a checkpoint folder must hold before anything is loaded from it, checked without torch: the launchers run
these checks before torchrun starts, in well under a second. Not part of the remote code copied into checkpoints."""

import json
from pathlib import Path

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
