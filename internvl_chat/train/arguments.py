"""Command-line arguments of the fine-tuning entry point, with the original script's names and defaults.

Three groups as in the original: model, data, and transformers' TrainingArguments. A few flags that the
original's transformers 4.37 accepted and transformers 5 dropped are mapped here, so the tutorial's command
lines run unchanged.
"""

from dataclasses import dataclass, field


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
    ps_version: str = field(default="v2", metadata={"help": "pixel shuffle version (v2 for InternVL2)"})
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
    down_sample_ratio: float = field(default=0.5, metadata={"help": "must equal the checkpoint's downsample_ratio"})
    conv_style: str = field(default="internlm2-chat", metadata={"help": "chat template"})
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
    group_by_image: bool = field(
        default=False,
        metadata={
            "help": "fast mode: one sequence per picture (its prompt and image once, every caption after it, each "
            "caption seeing only the prompt and itself). A step holds the tutorial's captions (whole pictures, about "
            "BATCH_SIZE of them) and the tutorial's loss weighting, in fewer, larger micro-batches"
        },
    )
    strict_data: bool = field(default=False, metadata={"help": "stop at the first bad sample instead of skipping"})


@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "accepted for the tutorial's command line; a run always resumes from its last complete checkpoint "
            "unless --auto_resume False"
        },
    )
    auto_resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint-*"})
    supervised_logits_only: bool = field(
        default=False,
        metadata={
            "help": "fast mode: the LM head only at supervised positions, and for InternLM2 the last decoder layer too "
            "(same loss and gradients as the original, without full-vocabulary logits at every position)"
        },
    )
    compile_blocks: bool = field(
        default=False,
        metadata={
            "help": "fast mode: torch.compile every ViT and LLM block (fused norms, rotary, LoRA dropout; the first "
            "steps compile, a minute or two)"
        },
    )
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
DROPPED_FLAGS = {"--save_safetensors"}  # always on in transformers 5


def normalize_argv(argv: list[str]) -> list[str]:
    out, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
            if not arg.startswith("--"):
                continue
        name, eq, value = arg.partition("=")
        if name in DROPPED_FLAGS:
            skip_value = not eq
            continue
        out.append(RENAMED_FLAGS.get(name, name) + eq + value)
    return out


def parse_args(argv: list[str]):
    from transformers import HfArgumentParser, TrainingArguments  # here: the launcher's checks import this module

    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, RunArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=normalize_argv(argv))
