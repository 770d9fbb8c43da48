"""Command-line arguments of the fine-tuning entry point, with the original script's names and defaults.

The original's groups (model, data, transformers' TrainingArguments), the fast modes' own group and the run's. A
few flags that the original's transformers 4.37 accepted and transformers 5 dropped, and a few the tutorial's
launchers pass that change nothing here, are handled in one list below, so the tutorial's command lines run
unchanged.
"""

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "InternVL2 checkpoint folder"})
    freeze_llm: bool = field(default=False, metadata={"help": "freeze the LLM (before LoRA wrapping)"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the vision encoder"})
    freeze_mlp: bool = field(default=False, metadata={"help": "freeze the projector mlp1"})
    unfreeze_vit_layers: int = field(
        default=0, metadata={"help": "train the ViT layers from this index on (negative: the last N)"}
    )
    vision_select_layer: int = field(default=-1, metadata={"help": "ViT layer whose output feeds the LLM"})
    use_backbone_lora: int = field(default=0, metadata={"help": "LoRA rank on the ViT (0: none)"})
    use_llm_lora: int = field(default=0, metadata={"help": "LoRA rank on the LLM (0: none); alpha = 2 x rank"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input (the original's 0.05)"})
    unfreeze_lm_head: bool = field(default=False, metadata={"help": "train the LM head"})
    grad_checkpoint: bool = field(default=True, metadata={"help": "gradient checkpointing in the LLM"})
    drop_path_rate: float = field(default=0.0, metadata={"help": "ViT stochastic depth"})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "eager | sdpa | flash_attention_2 | flex_attention (default: flash_attention_2 when flash-attn "
            "imports, else sdpa). With --group_by_image the LLM runs prefix_split (the rows up to the first "
            "caption's end through SDPA's causal kernel, the other captions' rows through flex attention on a "
            "GPU, SDPA on a CPU) unless flex_attention, sdpa or eager is asked for: flash attention takes no "
            "block mask"
        },
    )


@dataclass
class DataTrainingArguments:
    meta_path: str | None = field(default=None, metadata={"help": "meta json naming the training jsonl files"})
    data_root: str | None = field(
        default=None,
        metadata={
            "help": "resolve the meta file's relative root/annotation paths against this folder instead of the cwd"
        },
    )
    max_seq_length: int = field(default=4096, metadata={"help": "longest sample in tokens (image tokens count)"})
    force_image_size: int = field(default=448, metadata={"help": "tile size"})
    dynamic_image_size: bool = field(default=False, metadata={"help": "tile images (dynamic resolution)"})
    use_thumbnail: bool = field(default=False, metadata={"help": "add a thumbnail tile when there are several"})
    min_dynamic_patch: int = field(default=1)
    max_dynamic_patch: int | None = field(
        default=None,
        metadata={
            "help": "most tiles per image, thumbnail excluded (default: the checkpoint's max_dynamic_patch; the "
            "tutorial's launcher passes 6)"
        },
    )
    normalize_type: str = field(default="imagenet", metadata={"help": "imagenet | clip | siglip"})
    group_by_length: bool = field(default=False, metadata={"help": "the original's length-grouped sampler"})
    strict_data: bool = field(default=False, metadata={"help": "stop at the first bad sample instead of skipping"})


@dataclass
class FastModeArguments:
    """The fast modes: each keeps the tutorial's loss and gradients on the same captions (docs/PERFORMANCE.md says
    what each changes for the user)."""

    supervised_logits_only: bool = field(
        default=False,
        metadata={
            "help": "fast mode: the LM head only at supervised positions, and the last decoder layer of an LLM that "
            "takes output rows (InternLM2) only there too (same loss and gradients as the original, without "
            "full-vocabulary logits at every position)"
        },
    )
    compile_blocks: bool = field(
        default=False,
        metadata={
            "help": "fast mode: torch.compile every ViT and LLM block (fused norms, rotary, LoRA dropout; the first "
            "steps compile, a minute or two)"
        },
    )
    group_by_image: bool = field(
        default=False,
        metadata={
            "help": "fast mode: one sequence per picture (its prompt and image once, every caption after it, each "
            "caption seeing only the prompt and itself). A step holds the tutorial's captions (whole pictures, about "
            "BATCH_SIZE of them) and the tutorial's loss weighting, in fewer, larger micro-batches"
        },
    )


@dataclass
class RunArguments:
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "captions an optimizer step on all processes (the launchers pass their BATCH_SIZE): the "
            "micro-batches a step follow from it, --per_device_train_batch_size and the number of processes "
            "(instead of --gradient_accumulation_steps)"
        },
    )
    auto_resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint-*"})
    peak_tflops: float | None = field(
        default=None,
        metadata={"help": "accelerator bf16 dense peak for MFU (default: known cards, e.g. 989 for H100/H200)"},
    )
    verbose: bool = field(
        default=False,
        metadata={
            "help": "log everything: transformers' info messages, its progress bar, DeepSpeed's configuration and "
            "its per-step wall-clock breakdown (default: one line a logging step, warnings once)"
        },
    )
    profile_steps: str | None = field(
        default=None,
        metadata={
            "help": "FIRST,LAST: record these optimizer steps (1-based) with torch.profiler and write wall and kernel "
            "time per step and the top operators and kernels to OUTPUT_DIR/profile_steps_FIRST-LAST.txt, "
            "e.g. 20,22 (after torch.compile's first steps)"
        },
    )


# transformers 4.37 names -> transformers 5 names
# (--warmup_steps below 1 is a ratio of the total steps in transformers 5: ceil(0.03 x 1106) = 34, as before)
RENAMED_FLAGS = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}
# Flags the tutorial's launchers pass (and users copy) that change nothing here: accepted, and ignored, for the reason
# given.
IGNORED_FLAGS = {
    "--overwrite_output_dir": "a run always resumes from its last complete checkpoint-* (--auto_resume False starts "
    "afresh in the same folder)",
    "--save_safetensors": "transformers 5 always writes safetensors",
    "--use_fast_tokenizer": "the tokenizer is the one the checkpoint folder names, loaded as every run and the "
    "evaluation load it (Qwen2's has one implementation in transformers 5, the tokenizers one; InternLM2's is "
    "its sentencepiece one)",
}
# Flags the tutorial's launchers pass that name a fact of the checkpoint: accepted when they agree with its config.json
# field (and then change nothing), refused when they do not; flag -> the config field. --conv_style is the chat
# template: the checkpoint's `template` is what the run trains with, and what its saved config says.
CHECKPOINT_FACT_FLAGS = {
    "--down_sample_ratio": "downsample_ratio",
    "--ps_version": "ps_version",
    "--conv_style": "template",
}


class ArgumentError(ValueError):
    """A command line that contradicts itself or the checkpoint; the message names the flag."""


class FineTuneArguments(NamedTuple):
    model: ModelArguments
    data: DataTrainingArguments
    fast: FastModeArguments
    training: object  # transformers.TrainingArguments
    run: RunArguments
    checkpoint_facts: dict[str, str]  # config field -> the value a CHECKPOINT_FACT_FLAGS flag gave


def split_tutorial_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv for the parser (renamed flags renamed, ignored ones left out), and the checkpoint facts it states."""
    out, facts, index = [], {}, 0
    while index < len(argv):
        name, eq, value = argv[index].partition("=")
        has_separate_value = not eq and index + 1 < len(argv) and not argv[index + 1].startswith("--")
        if name in IGNORED_FLAGS or name in CHECKPOINT_FACT_FLAGS:
            if has_separate_value:
                value, index = argv[index + 1], index + 1
            if name in CHECKPOINT_FACT_FLAGS:
                facts[CHECKPOINT_FACT_FLAGS[name]] = value
        else:
            out.append(RENAMED_FLAGS.get(name, name) + eq + value)
        index += 1
    return out, facts


def checkpoint_fact_problems(facts: dict[str, str], config: dict, config_file) -> list[str]:
    """Where a CHECKPOINT_FACT_FLAGS flag contradicts the checkpoint's config.json (read without torch)."""
    problems = []
    for flag, name in CHECKPOINT_FACT_FLAGS.items():
        if name not in facts:
            continue
        given, actual = facts[name].strip("'\""), config.get(name)
        try:
            agrees = float(given) == float(actual) if isinstance(actual, (int, float)) else given == actual
        except ValueError:
            agrees = False
        if not agrees:
            problems.append(
                f"{flag} {given} contradicts the checkpoint: {config_file} has {name} {actual!r}; leave the flag out "
                "or give the checkpoint's value"
            )
    return problems


def tutorial_flags_help() -> str:
    lines = ["flags of the tutorial's launchers accepted for their command lines:"]
    lines += [f"  {flag}: ignored: {reason}" for flag, reason in IGNORED_FLAGS.items()]
    lines += [f"  {flag}: must equal the checkpoint's {field}" for flag, field in CHECKPOINT_FACT_FLAGS.items()]
    return "\n".join(lines)


def build_parser():
    import argparse

    from transformers import HfArgumentParser, TrainingArguments  # here: the launcher's checks import this module

    return HfArgumentParser(
        (ModelArguments, DataTrainingArguments, FastModeArguments, TrainingArguments, RunArguments),
        prog="internvl-finetune",
        description="Fine-tune InternVL2 (full or LoRA) on chat-format jsonl data; the launchers in "
        "shell/internvl2.0/2nd_finetune/ start it with torchrun.",
        epilog=tutorial_flags_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse_args(argv: list[str]) -> FineTuneArguments:
    """The command line, parsed once."""
    parser = build_parser()
    if len(argv) == 1 and argv[0].endswith(".json"):
        return FineTuneArguments(*parser.parse_json_file(argv[0]), {})
    argv, facts = split_tutorial_flags(argv)
    return FineTuneArguments(*parser.parse_args_into_dataclasses(args=argv), facts)
