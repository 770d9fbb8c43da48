"""Merge the LoRA adapters of a fine-tuning output into its weights and save a plain InternVL2 checkpoint.

  python tools/merge_lora.py work_dirs/internvl_chat_v2_0/<run> work_dirs/internvl_chat_v2_0/<run>_merged

The merge runs in float32 and the result is stored in the checkpoint's own dtype. The output is ready for
AutoModel.from_pretrained(out, trust_remote_code=True): remote-code files, auto_map, the fine-tune's config
(its max_dynamic_patch and template, LoRA fields set to 0), generation_config.json and the tokenizer. The
tutorial's two `cp` commands afterwards are not needed (and would replace the fine-tune's config).
"""

import argparse
import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

# torch and the model are imported once the inputs pass their checks: a refusal takes a fraction of a second
from internvl_chat.checkpoint.folder import CheckpointError, check_checkpoint_folder


class MergeError(ValueError):
    pass


def checkpoint_dtype(config: dict):
    import torch

    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return getattr(torch, name)


def weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))


def check_free_space(output: Path, needed: int) -> None:
    parent = output if output.exists() else output.parent
    parent = parent if parent.exists() else Path(".")
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise MergeError(
            f"not enough disk space for {output}: {needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free"
        )


def check_inputs(input_path: Path, output_path: Path, force: bool) -> dict:
    check_checkpoint_folder(input_path)
    config = json.loads((input_path / "config.json").read_text())
    if not config.get("use_llm_lora") and not config.get("use_backbone_lora"):
        raise MergeError(
            f"{input_path / 'config.json'} has use_llm_lora 0 and use_backbone_lora 0: there is no "
            f"LoRA to merge (this is already a plain checkpoint)"
        )
    if output_path.exists() and any(output_path.iterdir()) and not force:
        raise MergeError(f"{output_path} exists and is not empty; pass --force to write into it")
    if output_path.resolve() == input_path.resolve():
        raise MergeError("the output folder must differ from the input folder")
    # the merged weights are the base weights without adapters: at most the input's size
    check_free_space(output_path, weights_size(input_path))
    return config


def silence_deepspeed_accelerator_notice() -> None:
    """transformers consults DeepSpeed while saving; on a machine without GPU its first accelerator lookup
    prints a notice to stdout between the tutorial's lines. Do that lookup now, quietly."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from deepspeed.accelerator import get_accelerator

            get_accelerator()
    except ImportError:
        pass


def merge(input_path: Path, output_path: Path, force: bool = False) -> None:
    config = check_inputs(input_path, output_path, force)
    import torch
    from transformers import GenerationConfig

    from internvl_chat.checkpoint.loader import load_tokenizer
    from internvl_chat.checkpoint.serving_files import complete_checkpoint_files
    from internvl_chat.model.modeling_internvl_chat import InternVLChatModel

    silence_deepspeed_accelerator_notice()
    dtype = checkpoint_dtype(config)
    print("Loading model...", flush=True)
    model = InternVLChatModel.from_pretrained(input_path, dtype=torch.float32).eval()
    print("Loading tokenizer...", flush=True)
    tokenizer = load_tokenizer(input_path)
    if model.config.use_backbone_lora:
        model.vision_model = model.vision_model.merge_and_unload(progressbar=True)
        model.config.use_backbone_lora = 0
    if model.config.use_llm_lora:
        model.language_model = model.language_model.merge_and_unload(progressbar=True)
        model.config.use_llm_lora = 0
    model.language_model.config.use_cache = True  # training turns the KV cache off; inference wants it
    model = model.to(dtype)
    model.config.dtype = dtype
    print("Saving model...", flush=True)
    output_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_path)
    if (input_path / "generation_config.json").is_file():  # the stop tokens the fine-tune (and its base) had
        GenerationConfig.from_pretrained(input_path).save_pretrained(output_path)
    else:
        GenerationConfig.from_model_config(model.config.llm_config).save_pretrained(output_path)
    print("Saving tokenizer...", flush=True)
    tokenizer.save_pretrained(output_path)
    complete_checkpoint_files(output_path, tokenizer)  # chat_template where the originals keep it, stop tokens
    print("Done!", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_path", help="fine-tuning output with LoRA adapters (use_llm_lora > 0)")
    parser.add_argument("output_path", help="folder for the merged checkpoint")
    parser.add_argument("--force", action="store_true", help="write into an existing, non-empty output folder")
    args = parser.parse_args(argv)
    try:
        merge(Path(args.input_path), Path(args.output_path), args.force)
    except (MergeError, CheckpointError) as error:
        sys.exit(f"merge_lora: {error}")


if __name__ == "__main__":
    main()
